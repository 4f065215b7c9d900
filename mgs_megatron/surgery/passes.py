"""The two passes over the K stashed domain-gradient shards: per-module Gram and weighted combine.

`grads` is either a [K, N] tensor (fast path: every run is a strided [K, L] view, no copies) or a sequence of K
1-D tensors of length N (read through a small bounded scratch buffer). Half-precision gradients are upcast chunk
by chunk into that scratch buffer so that Gram and combine accumulate in fp32 (or fp64) without a K x N copy.

Long runs of a [K, N] tensor go through the one-pass compiled kernels of `compiled.py` (kernel="auto" or
"compiled"); everything else, and everything under kernel="eager", through the batched-matmul path here.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import compiled
from .segments import Segments

Grads = Union[torch.Tensor, Sequence[torch.Tensor]]

_BMM_CHUNK = 1 << 15  # inner length per batched matmul: CPU gemm with a 3x3 output is slow on very long rows
_COMBINE_CHUNK = 1 << 17  # combine as bmm over [r, K, chunk] views: threads split the batches (mv is serial)
_SCRATCH = 1 << 20  # elements per domain in the scratch buffer (4 MiB fp32 per domain); large chunks = few kernel
# launches / thread barriers, which matters on a busy CPU


def _rows(grads: Grads) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(f"grads tensor must be [K, N], got shape {tuple(grads.shape)}")
        if grads.stride(1) != 1:
            raise ValueError("grads tensor [K, N] must have unit stride along N")
        return grads, list(grads.unbind(0))
    rows = list(grads)
    for k, g in enumerate(rows):
        if not isinstance(g, torch.Tensor) or g.dim() != 1:
            raise ValueError(f"gradient shard of domain {k} must be a 1-D tensor")
        if g.numel() != rows[0].numel() or g.dtype != rows[0].dtype or g.device != rows[0].device:
            raise ValueError(f"gradient shard of domain {k}: numel/dtype/device {g.numel()}/{g.dtype}/{g.device} "
                             f"differ from domain 0's {rows[0].numel()}/{rows[0].dtype}/{rows[0].device}")
        if g.stride(0) != 1:
            raise ValueError(f"gradient shard of domain {k} must be contiguous")
    return None, rows


def _check_runs(segments: Segments, n: int) -> None:
    if segments.covered_end > n:
        s, e, m = segments.runs[-1]
        raise ValueError(f"module {segments.module_names[m]!r}: run [{s}, {e}) beyond the shard's {n} elements")


def _gram_block(x: torch.Tensor, acc: torch.Tensor) -> None:
    """acc += x @ x.T for x [K, L]; long rows go through bmm over [r, K, chunk] views (faster, parallel)."""
    L = x.shape[1]
    r = L // _BMM_CHUNK
    tail = x
    if r >= 2:
        y = x[:, : r * _BMM_CHUNK].unflatten(1, (r, _BMM_CHUNK)).transpose(0, 1)
        acc += torch.bmm(y, y.transpose(1, 2)).sum(0)
        tail = x[:, r * _BMM_CHUNK:]
    if tail.shape[1]:
        acc.addmm_(tail, tail.T)


def _combine_block(x: torch.Tensor, w: torch.Tensor, o: torch.Tensor) -> None:
    """o = w @ x for x [K, L], w [K], o [L] (written in place)."""
    K, L = x.shape
    r = L // _COMBINE_CHUNK
    n = r * _COMBINE_CHUNK
    if r >= 1:
        y = x[:, :n].unflatten(1, (r, _COMBINE_CHUNK)).transpose(0, 1)
        torch.bmm(w.view(1, 1, K).expand(r, 1, K), y, out=o[:n].view(r, 1, _COMBINE_CHUNK))
    if n < L:
        torch.mv(x[:, n:].T, w, out=o[n:])


def _chunks(s: int, e: int):
    for a in range(s, e, _SCRATCH):
        yield a, min(e, a + _SCRATCH)


def _load(scratch: torch.Tensor, stacked, rows, a: int, b: int) -> torch.Tensor:
    """Copy (and upcast) columns [a, b) of the K shards into a contiguous [K, b-a] view of the flat scratch."""
    buf = scratch[: len(rows) * (b - a)].view(len(rows), b - a)
    if stacked is not None:
        buf.copy_(stacked[:, a:b])  # one strided 2-D copy for all domains
    else:
        for k, r in enumerate(rows):
            buf[k].copy_(r[a:b])
    return buf


def _compiled_gram(x: torch.Tensor, acc: torch.Tensor, kernel: str) -> bool:
    """acc += x @ x.T for x [K, r * BLOCK] through the compiled kernel; False if it is unavailable."""
    K, n = x.shape
    y = x.unflatten(1, (n // compiled.BLOCK, compiled.BLOCK)).transpose(0, 1)
    sums = compiled.call("pair_sums", kernel, y, acc.dtype)
    if sums is NotImplemented:
        return False
    i, j = torch.triu_indices(K, K, device=acc.device)
    full = torch.zeros(K, K, dtype=torch.float64, device=acc.device)
    full[i, j] = full[j, i] = sums.sum(0, dtype=torch.float64)
    acc += full.to(acc.dtype)
    return True


def gram(segments: Segments, grads: Grads, *, dtype: torch.dtype = torch.float32,
         out: Optional[torch.Tensor] = None, kernel: str = "auto") -> torch.Tensor:
    """Per-module Gram G[m, i, j] = <g_i, g_j> restricted to module m's runs in this shard, in `dtype`.

    Partial Grams add: the Gram of a module split over shards (DP, TP) or over several flat buffers is the sum
    of the shards' Grams. With `out` the result is accumulated into it (same [M, K, K] shape and dtype).
    `kernel`: "auto" | "eager" | "compiled" (see compiled.py).
    """
    stacked, rows = _rows(grads)
    K, N = len(rows), (rows[0].numel() if rows else 0)
    M = segments.num_modules
    device = rows[0].device if rows else torch.device("cpu")
    if out is None:
        out = torch.zeros(M, K, K, dtype=dtype, device=device)
    elif tuple(out.shape) != (M, K, K) or out.dtype != dtype:
        raise ValueError(f"out must be [{M}, {K}, {K}] {dtype}, got {tuple(out.shape)} {out.dtype}")
    if K == 0:
        return out
    _check_runs(segments, N)
    scratch = None
    for s, e, m in segments.runs:
        if stacked is not None and compiled.use_compiled(kernel, e - s, device):
            n = (e - s) // compiled.BLOCK * compiled.BLOCK
            if _compiled_gram(stacked[:, s:s + n], out[m], kernel):
                s += n  # the tail (< BLOCK) goes the eager way
        if s == e:
            continue
        if stacked is not None and stacked.dtype == dtype:
            _gram_block(stacked[:, s:e], out[m])
            continue
        if scratch is None:
            scratch = torch.empty(K * min(_SCRATCH, max(N, 1)), dtype=dtype, device=device)
        for a, b in _chunks(s, e):
            _gram_block(_load(scratch, stacked, rows, a, b), out[m])
    return out


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _with_gaps(segments: Segments, n: int):
    """Runs plus the uncovered gaps (module index -1) so that combine writes every element of `out`."""
    pos = 0
    for s, e, m in segments.runs:
        if s > pos:
            yield pos, s, -1
        yield s, e, m
        pos = e
    if pos < n:
        yield pos, n, -1


def combine(segments: Segments, grads: Grads, W: torch.Tensor, out: torch.Tensor, *,
            kernel: str = "auto") -> torch.Tensor:
    """out[run] = sum_k W[m, k] * grads[k][run] for every run of module m, in one pass over the shards.

    Elements of `out` not covered by any run get the plain sum (weight 1 per domain), so `out` is always fully
    written. `out` may be one of the grads' rows (the scratch path is used then). Accumulates in fp32 for
    half-precision outputs. `kernel`: "auto" | "eager" | "compiled" (see compiled.py). Returns `out`.
    """
    stacked, rows = _rows(grads)
    K, M = len(rows), segments.num_modules
    if out.dim() != 1 or out.stride(0) != 1:
        raise ValueError("out must be a contiguous 1-D tensor")
    N = out.numel()
    if rows and rows[0].numel() != N:
        raise ValueError(f"out has {N} elements, gradient shards have {rows[0].numel()}")
    if tuple(W.shape) != (M, K):
        raise ValueError(f"W must be [{M}, {K}] (modules x domains), got {tuple(W.shape)}")
    _check_runs(segments, N)
    if K == 0:
        return out.zero_()
    cdt = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
    ws = list(W.to(device=out.device, dtype=cdt).unbind(0))
    ones = torch.ones(K, dtype=cdt, device=out.device)
    alias = any(_overlaps(out, r) for r in rows)
    direct = stacked is not None and stacked.dtype == cdt and out.dtype == cdt and not alias
    scratch = vec = None
    for s, e, m in _with_gaps(segments, N):
        w = ws[m] if m >= 0 else ones
        if stacked is not None and not alias and compiled.use_compiled(kernel, e - s, out.device):
            if compiled.call("weighted_sum_", kernel, stacked[:, s:e], w, out[s:e]) is not NotImplemented:
                continue
        if direct:
            _combine_block(stacked[:, s:e], w, out[s:e])
            continue
        if scratch is None:
            L = min(_SCRATCH, max(N, 1))
            scratch = torch.empty(K * L, dtype=cdt, device=out.device)
            vec = None if out.dtype == cdt else torch.empty(L, dtype=cdt, device=out.device)
        for a, b in _chunks(s, e):
            buf = _load(scratch, stacked, rows, a, b)
            if vec is None:
                _combine_block(buf, w, out[a:b])
            else:
                _combine_block(buf, w, vec[: b - a])
                out[a:b].copy_(vec[: b - a])
    return out
