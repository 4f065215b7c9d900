"""Glue-free entry points: Gram -> weights with non-finite handling, and a single-process API for plain
PyTorch modules (per-domain gradients in, combined gradients written into p.grad)."""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch

from .config import SurgeryConfig
from .layout import ParamLayout, module_layer
from .passes import combine, gram
from .rules import Rule
from .segments import Segments, build_segments
from .stats import surgery_stats, surgery_tensors


def weights_from_gram(rule: Rule, G: torch.Tensor, segments: Segments, step: int, domains: Sequence[str],
                      on_nonfinite: str = "error") -> Tuple[torch.Tensor, int]:
    """W[M, K] from the (all-reduced) Gram; returns (W, number of modules with a non-finite Gram).

    on_nonfinite="error": raise ValueError naming the modules and domains. "sum" (and "skip_step", whose caller
    then skips the update): those modules get W = 1, the plain sum (the combined gradient stays non-finite).
    """
    bad = ~torch.isfinite(G).flatten(1).all(1)
    nbad = int(bad.sum())  # one sync per step, outside any loop
    if nbad == 0:
        return rule.weights(G, segments.module_keys, step, domains), 0
    if on_nonfinite == "error":
        idx = bad.nonzero().flatten().tolist()[:5]
        detail = []
        for m in idx:
            ks = (~torch.isfinite(G[m].diagonal())).nonzero().flatten().tolist()
            detail.append(f"{segments.module_names[m]!r} (domains {[domains[k] for k in ks] or 'cross terms'})")
        raise ValueError(f"non-finite gradients in {nbad} module(s): " + ", ".join(detail))
    Gc = torch.where(bad.view(-1, 1, 1), torch.zeros_like(G), G)
    W = rule.weights(Gc, segments.module_keys, step, domains)
    return torch.where(bad.view(-1, 1), torch.ones_like(W), W), nbad


def default_layout(name: str, shape: Sequence[int]) -> ParamLayout:
    """One block named like the parameter; layer parsed from "...layers.{i}..."; 0-d params become (1,)."""
    return ParamLayout(name=name, shape=tuple(shape) or (1,), layer=module_layer(name))


ParamsLike = Union[torch.nn.Module, Iterable[Tuple[str, torch.nn.Parameter]]]


def apply_mgs(params: ParamsLike, per_domain_grads: Mapping[str, Mapping[str, Optional[torch.Tensor]]],
              config: Optional[SurgeryConfig] = None, step: int = 0, *, rule: Optional[Rule] = None,
              layouts: Optional[Mapping[str, ParamLayout]] = None, return_tensors: bool = False) -> Dict:
    """Combine per-domain gradients with MGS and write the result into p.grad (single process).

    per_domain_grads: {domain: {param_name: grad}}. Domains are sorted by name. A domain with no gradient at all
    is absent this step (K = domains present); a parameter missing from a present domain counts as a zero
    gradient there; parameters with no gradient in any domain keep their .grad. `layouts` may give fused-view
    layouts (e.g. fused_qkv_blocks) for some parameters; others get `default_layout`. Pass a persistent `rule`
    (config.make_rule()) for stateful rules such as gradvac; otherwise a fresh one is made from `config`.
    Returns the stats dict (plus "tensors" with the full per-module tensors when return_tensors).
    """
    config = config or SurgeryConfig()
    rule = rule or config.make_rule()
    named = list(params.named_parameters() if isinstance(params, torch.nn.Module) else params)
    by_name = dict(named)
    for d, grads in per_domain_grads.items():
        for n, g in grads.items():
            if n not in by_name:
                raise ValueError(f"domain {d!r}: gradient for unknown parameter {n!r}")
            if g is not None and tuple(g.shape) != tuple(by_name[n].shape):
                raise ValueError(f"domain {d!r}, parameter {n!r}: gradient shape {tuple(g.shape)} != "
                                 f"parameter shape {tuple(by_name[n].shape)}")
    domains = sorted(d for d, gs in per_domain_grads.items() if any(g is not None for g in gs.values()))
    used = [(n, p) for n, p in named if any(per_domain_grads[d].get(n) is not None for d in domains)]
    if not domains or not used:
        return {"surgery/num_domains": float(len(domains)), "surgery/num_modules": 0.0}
    dtype = torch.float32
    for d in domains:
        for g in per_domain_grads[d].values():
            if g is not None:
                dtype = torch.promote_types(dtype, g.dtype)
    layouts = layouts or {}
    pieces, offsets, off = [], [], 0
    for n, p in used:
        lay = layouts.get(n) or default_layout(n, p.shape)
        if lay.numel != p.numel():
            raise ValueError(f"layout of {n!r} has {lay.numel} elements, parameter has {p.numel()}")
        pieces.append((lay, 0, lay.numel, off))
        offsets.append(off)
        off += lay.numel
    device = used[0][1].device
    stacked = torch.zeros(len(domains), off, dtype=dtype, device=device)  # single-process convenience copy
    for k, d in enumerate(domains):
        for (n, _), o in zip(used, offsets):
            g = per_domain_grads[d].get(n)
            if g is not None:
                stacked[k, o:o + g.numel()].copy_(g.reshape(-1))
    seg = build_segments(pieces, config.granularity)
    G = gram(seg, stacked, kernel=config.kernel)
    W, nbad = weights_from_gram(rule, G, seg, step, domains, config.on_nonfinite)
    out = combine(seg, stacked, W, torch.empty(off, dtype=dtype, device=device), kernel=config.kernel)
    for (n, p), o in zip(used, offsets):
        new = out[o:o + p.numel()].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = new  # a view of one flat buffer: no extra copy
        else:
            p.grad.copy_(new)
    stats = surgery_stats(G, W, seg, domains, extra={"nonfinite_modules": nbad})
    if return_tensors:
        stats["tensors"] = dict(surgery_tensors(G, W), module_names=seg.module_names, domains=domains)
    return stats


class MGS:
    """Holds a config and a (possibly stateful) rule across steps for the single-process API."""

    def __init__(self, config: Optional[SurgeryConfig] = None):
        self.config = config or SurgeryConfig()
        self.rule = self.config.make_rule()

    def apply(self, params: ParamsLike, per_domain_grads, step: int, **kw) -> Dict:
        return apply_mgs(params, per_domain_grads, self.config, step, rule=self.rule, **kw)

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state["rule"])
