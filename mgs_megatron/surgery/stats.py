"""Per-step surgery statistics from the Gram G[M, K, K] and the weights W[M, K] (no extra pass over gradients).

`surgery_stats` returns a flat dict of floats for loggers, summarised by module type (q_proj, k_proj, ...), by
layer ("layer.3"), and over everything ("all"):
  {p}/cos/{a}-{b}/{group}            cosine of domains a, b on the group's concatenated gradient
  {p}/conflict_frac/{a}-{b}/{group}  fraction of the group's modules where <g_a, g_b> < 0
  {p}/norm/{a}/{group}               |g_a| on the group
  {p}/norm_sum/{group}               |sum_k g_k| (Mixed-RL gradient) on the group
  {p}/norm_after/{group}             |sum_k W_k g_k| = sqrt(w^T G w) (after surgery) on the group
  {p}/conflicts/{a}-{b}              number of modules with a negative dot (float)
  {p}/num_modules, {p}/num_domains
`surgery_tensors` returns the full per-module tensors (for plots).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

from .layout import module_layer, module_type
from .segments import Segments


def surgery_tensors(G: torch.Tensor, W: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-module tensors: cos [M,K,K], conflict [M,K,K] bool, norm [M,K], norm_sum [M], norm_after [M]."""
    g = G.detach().to(torch.float64)
    w = W.detach().to(torch.float64)
    diag = g.diagonal(dim1=1, dim2=2).clamp_min(0)
    norm = diag.sqrt()
    den = norm.unsqueeze(2) * norm.unsqueeze(1)
    cos = torch.where(den > 0, g / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(g))
    ones = torch.ones_like(w)
    quad = lambda v: torch.einsum("mi,mij,mj->m", v, g, v).clamp_min(0)  # noqa: E731
    return {"gram": g, "weights": w, "cos": cos, "conflict": g < 0, "norm": norm,
            "norm_sum": quad(ones).sqrt(), "norm_after": quad(w).sqrt()}


def _group(labels):
    names = sorted(set(labels))
    idx = {n: i for i, n in enumerate(names)}
    return names, torch.tensor([idx[x] for x in labels], dtype=torch.int64, device="cpu")


def surgery_stats(G: torch.Tensor, W: torch.Tensor, modules: Union[Segments, Sequence[str]],
                  domains: Sequence[str], prefix: str = "surgery",
                  extra: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    names = modules.module_names if isinstance(modules, Segments) else tuple(modules)
    M, K = G.shape[0], G.shape[1]
    if len(names) != M or len(domains) != K:
        raise ValueError(f"stats: G is [{M}, {K}, {K}] but got {len(names)} module names and {len(domains)} domains")
    g = G.detach().to(torch.float64).cpu()
    w = W.detach().to(torch.float64).cpu()
    q_sum = torch.einsum("mij->m", g)
    q_after = torch.einsum("mi,mij,mj->m", w, g, w)
    labels = [module_type(n) for n in names]
    layer_of = [module_layer(n) for n in names]
    groups = []  # (group label per module or None, group names)
    groups.append(_group(labels))
    lay = [f"layer.{x}" for x in layer_of if x is not None]
    if lay:
        sel = torch.tensor([x is not None for x in layer_of], device="cpu")
        gn, gi = _group(lay)
        full = torch.full((M,), -1, dtype=torch.int64, device="cpu")
        full[sel] = gi
        groups.append((gn, full))
    groups.append((["all"], torch.zeros(M, dtype=torch.int64, device="cpu")))
    pairs = [(a, b) for a in range(K) for b in range(a + 1, K)]
    out: Dict[str, float] = {f"{prefix}/num_modules": float(M), f"{prefix}/num_domains": float(K)}
    keys, vals = [], []
    for gnames, gidx in groups:
        sel = gidx >= 0
        T = len(gnames)
        gi = gidx[sel]
        Gt = torch.zeros(T, K, K, dtype=torch.float64, device="cpu").index_add_(0, gi, g[sel])
        ones = torch.ones_like(gi, dtype=torch.float64)
        cnt = torch.zeros(T, dtype=torch.float64, device="cpu").index_add_(0, gi, ones)
        conf = torch.zeros(T, K, K, dtype=torch.float64, device="cpu").index_add_(0, gi, (g[sel] < 0).double())
        qs = torch.zeros(T, dtype=torch.float64, device="cpu").index_add_(0, gi, q_sum[sel])
        qa = torch.zeros(T, dtype=torch.float64, device="cpu").index_add_(0, gi, q_after[sel])
        nrm = Gt.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        for t, gname in enumerate(gnames):
            for a, b in pairs:
                den = nrm[t, a] * nrm[t, b]
                keys += [f"{prefix}/cos/{domains[a]}-{domains[b]}/{gname}",
                         f"{prefix}/conflict_frac/{domains[a]}-{domains[b]}/{gname}"]
                vals += [torch.where(den > 0, Gt[t, a, b] / torch.where(den > 0, den, 1.0), 0.0),
                         conf[t, a, b] / cnt[t].clamp_min(1)]
            for a in range(K):
                keys.append(f"{prefix}/norm/{domains[a]}/{gname}")
                vals.append(nrm[t, a])
            keys += [f"{prefix}/norm_sum/{gname}", f"{prefix}/norm_after/{gname}"]
            vals += [qs[t].clamp_min(0).sqrt(), qa[t].clamp_min(0).sqrt()]
    for a, b in pairs:
        keys.append(f"{prefix}/conflicts/{domains[a]}-{domains[b]}")
        vals.append((g[:, a, b] < 0).double().sum())
    if vals:  # one conversion at the end, no per-entry .item()
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device="cpu") for v in vals])
        out.update(zip(keys, stacked.tolist()))
    if extra:
        out.update({f"{prefix}/{k}": float(v) for k, v in extra.items()})
    return out
