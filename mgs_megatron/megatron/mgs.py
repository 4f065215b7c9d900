"""Modular Gradient Surgery inside Megatron-Core: per-domain gradients on DDP grad buffers, surgery, optimizer step.

    mgs = ModularGradientSurgery(model_chunks, optimizer, MGSConfig(rule="pcgrad"), domains=("math", "chat", "if"))
    for domain, micro_batches in step_batches_by_domain:
        with mgs.domain(domain):
            forward_backward_func(...)            # Megatron's own schedule, any PP
    ok, grad_norm, num_zeros, stats = mgs.step()

Per domain: the grad buffers are zeroed, the schedule accumulates that domain's micro-batches, Megatron's own
finish_grad_sync reduces them across DP on their own (domain purity), and this rank's owned part of the reduced
gradient is stashed (distributed optimizer: the rank's shard of each bucket, K x N / DP numbers). At step():
per-module Grams from the owned pieces -> one all-reduce over the world group (modules owned elsewhere contribute
zeros; TP duplicates and the tied output copy are counted once) -> rule weights -> sum_k w_mk g_k written into
the owned part of the buffers -> the optimizer's own clip and step.

Every rank must enter the same domains in the same order (each domain's reduction is a collective); a rank with no
micro-batches of a domain enters it with none.

The hook: `mgs.domain()` wraps whatever `config.finalize_model_grads_func` holds when it is entered (the host's own
hook, or Megatron's finalize_model_grads when it is None) and hands the field back as the host left it on exit.
Hosts set that field themselves (verl once at optimizer build, slime on every train() call, NeMo-RL to None for a
step): a change between domains or steps is wrapped at the next entry; None set inside a domain is handled (MGS
reduces the domain itself); another hook set inside a domain, which the schedule may then have called instead of
MGS's, raises MGSError naming the field. With config.calculate_per_token_loss the per-domain reductions are
left unnormalised and the combined gradient is divided by the step's global token count, so that rule="sum" is
exactly the ordinary Megatron step over all domains.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.devices import HOST, collective_device, compute_device
from mgs_megatron.megatron.module_map import counted_once, param_layouts
from mgs_megatron.megatron.schedule import is_loss_reporting_rank
from mgs_megatron.models import ModelConfig
from mgs_megatron.surgery import (
    Piece,
    Segments,
    SurgeryConfig,
    build_segments,
    combine,
    gram,
    surgery_stats,
    weights_from_gram,
)
from mgs_megatron.surgery.segments import local_module_names

MGSConfig = SurgeryConfig  # the public name of the surgery's configuration in the Megatron plug-in


class MGSError(RuntimeError):
    pass


@dataclass
class OwnedRange:
    """One contiguous range of a grad buffer that this rank owns after the DP reduction: its view, its place in
    the stash, the pieces of parameters in it (all of them for the combine; for the Gram, without TP duplicates
    and the tied output copy) and their module segments."""

    view: torch.Tensor
    stash_offset: int
    gram_pieces: list[Piece]
    all_pieces: list[Piece]
    seg_gram: Optional[Segments] = None
    seg_all: Optional[Segments] = None


def _ddp_class():
    from megatron.core.distributed import DistributedDataParallel

    return DistributedDataParallel


class ModularGradientSurgery:
    """Modular Gradient Surgery on Megatron-Core's DDP grad buffers and (distributed) optimizer.

    Args:
        model_chunks: the DDP-wrapped model chunks (one per virtual pipeline stage), as given to the schedule.
        optimizer: Megatron's optimizer over those chunks (`get_megatron_optimizer`; distributed or not,
            chained or not). `step()` runs its own clip and update on the combined gradient.
        config: the surgery (MGSConfig = surgery.SurgeryConfig: rule, granularity, seed, eps, ...).
        domains: every domain that may appear, in the order every rank enters them each step.
        model_config: the model's ModelConfig, for HF module names; read off the TransformerConfig when None.

    Use: per step, every rank enters every domain (`with mgs.domain(d):` around Megatron's own schedule over
    that rank's micro-batches of d, possibly none), then `ok, grad_norm, num_zeros, stats = mgs.step()`.
    """

    def __init__(self, model_chunks, optimizer, config: SurgeryConfig, domains: Sequence[str], *,
                 model_config: Optional[ModelConfig] = None):
        chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        DDP = _ddp_class()
        for i, c in enumerate(chunks):
            if not isinstance(c, DDP):
                raise MGSError(f"model chunk {i} is a {type(c).__name__}, not megatron.core DistributedDataParallel: "
                               f"wrap each chunk in Megatron DDP (mgs_megatron.megatron.optim.wrap_ddp)")
        self.domains = tuple(domains)
        if not self.domains:
            raise MGSError("ModularGradientSurgery: declare the domains, e.g. domains=('math', 'chat', 'if')")
        if len(set(self.domains)) != len(self.domains):
            raise MGSError(f"ModularGradientSurgery: domains has duplicates: {self.domains}")
        self.chunks, self.optimizer, self.config = chunks, optimizer, config
        self.rule = config.make_rule()
        self.step_count = 0
        self._active: Optional[str] = None
        self._present: list[str] = []
        self._reduced = False
        self._skip = False  # the last surgery found a non-finite gradient under on_nonfinite="skip_step"
        self.per_token = bool(getattr(chunks[0].config, "calculate_per_token_loss", False))
        config = chunks[0].config
        if config.no_sync_func is None:  # the schedule accumulates a domain's micro-batches without reducing
            no_sync = [c.no_sync for c in chunks]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self._ranges = self._owned_ranges(param_layouts(chunks, model_config))
        self._check_against_optimizer()
        self._stash_numel = sum(r.view.numel() for r in self._ranges)
        dtype = self._ranges[0].view.dtype if self._ranges else torch.float32
        device = self._ranges[0].view.device if self._ranges else compute_device()
        self._stash = torch.empty(len(self.domains), self._stash_numel, dtype=dtype, device=device)
        self._local_tokens = torch.zeros((), dtype=torch.float64, device=device)  # this rank's loss tokens
        self._build_segments()

    # ---- set-up -------------------------------------------------------------------------------------------
    def _wrap_host_hook(self) -> None:
        """Install MGS's finalize hook around what the host's config holds now (kept in self._host_hook)."""
        from megatron.core.distributed import finalize_model_grads

        config = self.chunks[0].config
        self._host_hook = host = config.finalize_model_grads_func
        inner = host or finalize_model_grads
        while getattr(inner, "_mgs_owner", None) is not None:  # a hook left by an earlier MGS: wrap what it wrapped
            inner = inner._mgs_inner

        def finalize(model, num_tokens=None, *args, **kwargs):
            if self._active is None:  # an ordinary (non-MGS) step through the same schedule
                return inner(model, num_tokens, *args, **kwargs)
            if num_tokens is not None:  # keep the domain unnormalised; step() divides by the global count
                self._local_tokens += num_tokens.detach().to(self._local_tokens.device, torch.float64).sum()
            self._reduced = True
            return inner(model, None, *args, **kwargs)

        finalize._mgs_owner, finalize._mgs_inner = self, inner
        config.finalize_model_grads_func = finalize
        self._finalize = finalize

    def _unwrap_host_hook(self, host) -> None:
        config = self.chunks[0].config
        if config.finalize_model_grads_func is self._finalize:  # else the host set it since: its choice stands
            config.finalize_model_grads_func = host

    def _check_hook_kept(self, name: str) -> None:
        """Inside the domain the host may have replaced the field. None: the schedule reduced nothing, MGS does it
        (NeMo-RL's split step). Another hook, with MGS's not called: the schedule may have called the host's
        instead, reducing and normalising this domain's gradient without MGS - an error."""
        current = self.chunks[0].config.finalize_model_grads_func
        if current is self._finalize or current is None or self._reduced:
            return
        raise MGSError(f"config.finalize_model_grads_func was replaced inside mgs.domain({name!r}) (by "
                       f"{getattr(current, '__qualname__', current)!r}) and MGS's hook was not called: Megatron's "
                       f"schedule would have called the new hook instead, reducing this domain's gradient without "
                       f"MGS. Set finalize_model_grads_func before entering mgs.domain() (it wraps whatever the field "
                       f"holds then), not inside it.")

    def _owned_ranges(self, layouts) -> list[OwnedRange]:
        """Owned ranges of every buffer: the distributed optimizer's shard of each bucket, or (plain DDP, where
        every DP rank holds the full reduced gradient) a 1/DP slice for the Gram and the whole bucket to combine."""
        ranges, offset = [], 0
        self._owned_param_ranges: dict = {}  # param -> [start, end) in its buffer (checked against the optimizer)
        dist_opt = self.chunks[0].ddp_config.use_distributed_optimizer
        for chunk in self.chunks:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                dp = buffer.data_parallel_group.size()
                dp_rank = buffer.data_parallel_group.rank()
                for bucket in buffer.buckets:
                    n = bucket.grad_data.numel()
                    if dist_opt:
                        lo, hi = bucket.offset + dp_rank * n // dp, bucket.offset + (dp_rank + 1) * n // dp
                        gram_lo, gram_hi = lo, hi
                    else:
                        lo, hi = bucket.offset, bucket.offset + n
                        gram_lo, gram_hi = lo + dp_rank * n // dp, lo + (dp_rank + 1) * n // dp
                    pieces_gram, pieces_all = [], []
                    for p in bucket.params_list:
                        start, end, _ = buffer.param_index_map[p]
                        for dst, (a_lim, b_lim) in ((pieces_all, (lo, hi)), (pieces_gram, (gram_lo, gram_hi))):
                            if dst is pieces_gram and not counted_once(p):
                                continue
                            a, b = max(start, a_lim), min(end, b_lim)
                            if a < b:
                                dst.append(Piece(layouts[p], a - start, b - start, a - lo))
                                if dst is pieces_all:
                                    self._owned_param_ranges[p] = (a, b)
                    ranges.append(OwnedRange(buffer.grad_data[lo:hi], offset, pieces_gram, pieces_all))
                    offset += hi - lo
        return ranges

    def _check_against_optimizer(self) -> None:
        """With the distributed optimizer, the owned ranges must be exactly the optimizer's shards (Megatron's
        `gbuf_ranges`): the combine writes what the optimizer then reads."""
        if not self.chunks[0].ddp_config.use_distributed_optimizer:
            return
        theirs = {}
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for by_dtype in getattr(opt, "gbuf_ranges", []):
                for buckets in by_dtype.values():
                    for bucket in buckets:
                        for param, r in bucket["param_map"].items():
                            theirs[param] = (r["gbuf_world"].start, r["gbuf_world"].end)
        if not theirs:  # an optimizer without Megatron's shard map: nothing to compare with
            return
        ours = self._owned_param_ranges
        if ours != theirs:
            bad = [p for p in set(ours) | set(theirs) if ours.get(p) != theirs.get(p)][:3]
            raise MGSError(f"MGS owned ranges differ from the distributed optimizer's shards for {len(bad)}+ "
                           f"parameter(s), e.g. ours {[ours.get(p) for p in bad]} vs {[theirs.get(p) for p in bad]}")

    def _build_segments(self) -> None:
        g = self.config.granularity
        local = sorted({n for r in self._ranges for n in local_module_names(r.all_pieces, g)})
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        self.module_names = tuple(sorted({n for names in gathered for n in names}))
        for r in self._ranges:
            r.seg_gram = build_segments(r.gram_pieces, g, module_names=self.module_names)
            r.seg_all = build_segments(r.all_pieces, g, module_names=self.module_names)
        self.module_segments = self._ranges[0].seg_all if self._ranges else build_segments([], g, self.module_names)

    # ---- per domain ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def domain(self, name: str):
        if self._active is not None:
            raise MGSError(f"mgs.domain({name!r}) entered inside mgs.domain({self._active!r}): domains cannot nest")
        if name not in self.domains:
            raise MGSError(f"domain {name!r} was not declared; declared: {self.domains}")
        for c in self.chunks:
            c.zero_grad_buffer()
        # param.grad may still alias main_grad from the last optimizer step: autograd would accumulate into it
        # and DDP's hook would then add it again (Megatron's own train_step zeroes both, too).
        self.optimizer.zero_grad()
        self._active, self._reduced = name, False
        self._wrap_host_hook()  # whatever the host's field holds now (it may have changed since the last domain)
        host = self._host_hook
        try:
            yield self
            self._check_hook_kept(name)
            if not self._reduced:  # manual backward, no micro-batches of this domain here, or the host's None
                self._finalize(self.chunks)
            self._stash_domain(name)
        finally:
            self._active = None
            self._unwrap_host_hook(host)

    def one_schedule(self, order: Sequence[str]):
        """Context for ONE schedule call over this rank's micro-batches of every domain, grouped by domain
        (`order`: the domain of each micro-batch, in schedule order); each domain's gradient is still separated
        and reduced on its own (one_schedule.py: one pipeline fill and drain per step instead of K, for K x N
        more memory during the step)."""
        from mgs_megatron.megatron.one_schedule import one_schedule

        return one_schedule(self, order)

    def _stash_domain(self, name: str) -> None:
        k = self.domains.index(name)
        row = self._stash[k]
        first = name not in self._present
        for r in self._ranges:
            dst = row[r.stash_offset:r.stash_offset + r.view.numel()]
            dst.copy_(r.view) if first else dst.add_(r.view)
        if first:
            self._present.append(name)

    # ---- the step -----------------------------------------------------------------------------------------
    def _present_rows(self):
        """Present domains in declaration order and their stash rows: a [K, N] view when they are contiguous in
        the stash (no copy), else a list of 1-D rows (fancy indexing would copy K x N numbers)."""
        order = [d for d in self.domains if d in self._present]
        idx = [self.domains.index(d) for d in order]
        if idx == list(range(idx[0], idx[-1] + 1)):
            return order, self._stash[idx[0]:idx[-1] + 1]
        return order, [self._stash[k] for k in idx]

    @staticmethod
    def _slice(rows, a: int, b: int):
        return rows[:, a:b] if isinstance(rows, torch.Tensor) else [r[a:b] for r in rows]

    def surgery(self) -> dict:
        """Gram -> all-reduce -> weights -> combined gradient in the buffers. Returns the stats."""
        if self._active is not None:
            raise MGSError(f"step() inside mgs.domain({self._active!r})")
        if not self._present:
            raise MGSError("step() with no domain: run each domain's micro-batches inside `with mgs.domain(name):`")
        start = time.perf_counter()
        domains, rows = self._present_rows()
        K, M = len(domains), len(self.module_names)
        local = torch.zeros(M, K, K, dtype=torch.float32, device=self._stash.device)
        for r in self._ranges:
            gram(r.seg_gram, self._slice(rows, r.stash_offset, r.stash_offset + r.view.numel()), out=local,
                 kernel=self.config.kernel)
        G = torch.empty(M * K * K + 1, dtype=torch.float64, device=local.device)
        G[:-1] = local.flatten()
        G[-1] = self._local_tokens if is_loss_reporting_rank() else 0.0
        dist.all_reduce(G)  # one all-reduce: the Gram of every module, plus the step's token count
        scale = 1.0 / max(float(G[-1]), 1.0) if self.per_token else 1.0
        Gv = G[:-1].view(M, K, K).to(torch.float32)
        finite = torch.isfinite(Gv).flatten(1).all(1)
        self._skip = self.config.on_nonfinite == "skip_step" and not bool(finite.all())
        if self._skip:  # no update this step: neither the (stateful) rule nor the grad buffers are touched
            W, nonfinite = torch.ones(M, K, dtype=Gv.dtype, device=Gv.device), int((~finite).sum())
        else:
            W, nonfinite = weights_from_gram(self.rule, Gv, self.module_segments, self.step_count, domains,
                                             self.config.on_nonfinite)
            Ws = (W * scale).to(torch.float32)
            for r in self._ranges:
                combine(r.seg_all, self._slice(rows, r.stash_offset, r.stash_offset + r.view.numel()), Ws, r.view,
                        kernel=self.config.kernel)
        extra = {"stash_bytes": float(self._stash.numel() * self._stash.element_size()),
                 "allreduce_bytes": float(G.numel() * G.element_size()),
                 "nonfinite_modules": float(nonfinite), "num_domains": float(K),
                 "seconds": time.perf_counter() - start}
        stats = surgery_stats(Gv * scale * scale, W, self.module_names, domains, extra=extra)
        self.last_gram, self.last_weights, self.last_domains = Gv * scale * scale, W, domains
        return stats

    def step(self):
        """Surgery, then the optimizer's own clip + step. Returns (ok, grad_norm, num_zeros, stats). With
        on_nonfinite="skip_step" a non-finite gradient skips the update (ok=False; parameters, optimizer state and
        the rule's state untouched) and the step counts."""
        stats = self.surgery()
        if self._skip:
            for c in self.chunks:
                c.zero_grad_buffer()
            ok, grad_norm, num_zeros = False, None, None
        else:
            ok, grad_norm, num_zeros = self.optimizer.step()
        self.step_count += 1
        self._present.clear()
        self._local_tokens.zero_()
        return ok, grad_norm, num_zeros, stats

    # ---- checkpointing and inspection ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step_count, "rule": self.rule.state_dict(), "config": self.config.to_dict(),
                "domains": list(self.domains)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.rule.load_state_dict(state["rule"])

    @torch.no_grad()
    def stashed_gradient(self, domain: str) -> dict[str, torch.Tensor]:
        """Domain's reduced gradient as canonical full host tensors (all ranks; for tests and debugging)."""
        from megatron.core import parallel_state as ps

        from mgs_megatron.megatron.state import full_from_shards, named_global_parameters

        k = self.domains.index(domain)
        by_param = {}
        for r in self._ranges:
            for layout, a, b, off in r.all_pieces:
                by_param.setdefault(layout.name, []).append((a, b, self._stash[k, r.stash_offset + off:
                                                                             r.stash_offset + off + b - a]))
        dist_opt = self.chunks[0].ddp_config.use_distributed_optimizer
        out = {}
        tp = ps.get_tensor_model_parallel_world_size()
        for name, p, gpt in named_global_parameters(self.chunks):
            if name == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
                continue
            local = torch.zeros(p.numel(), dtype=torch.float32, device=collective_device(ps.get_data_parallel_group()))
            for a, b, t in by_param.get(name, []):
                local[a:b] = t.float()
            if dist_opt:
                dist.all_reduce(local, group=ps.get_data_parallel_group())
            local = local.view(p.shape)
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                shards = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
                local = full_from_shards(name, shards, p, gpt.config.gated_linear_unit)
            out[name] = local.to(HOST)  # host copies: all_gather_object pickles them
        if ps.get_pipeline_model_parallel_world_size() > 1:
            parts: list = [None] * ps.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(parts, out, group=ps.get_pipeline_model_parallel_group())
            out = {k2: v for part in parts for k2, v in part.items()}
        return out


__all__ = ["MGSConfig", "MGSError", "ModularGradientSurgery"]
