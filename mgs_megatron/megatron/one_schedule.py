"""All domains in ONE Megatron schedule call, their gradients still separated exactly (`mgs.one_schedule(order)`).

With pipeline parallelism one schedule call per domain costs K pipeline fills and drains per step: for m
micro-batches per rank and p stages, about M + K(p - 1) micro-batch slots instead of M + p - 1. Here the
micro-batches go through one call, ordered by domain, and each stage separates the domains itself:

  * a forward hook on every model chunk passes each micro-batch's output through an identity autograd function;
    its backward is the first thing to run when that micro-batch's backward starts on the stage;
  * 1F1B (and interleaved 1F1B, per chunk) runs a stage's backward passes in micro-batch order, so when the first
    micro-batch of a new domain starts its backward, the chunk's grad buffer holds exactly the previous domain's
    accumulated (unreduced) gradient: it is copied aside and the buffer zeroed;
  * the schedule's finalize hook only records the token count; after the call each declared domain is reduced on
    its own, in declaration order on every rank (a domain a rank did not see is reduced as zeros), through
    `mgs.domain()`, exactly as if it had had its own schedule call.

The price is memory: the unreduced copies are K x N per rank for the length of the step (the per-call path keeps
only K x N / DP). Needs overlap_grad_reduce=False (the reductions happen after the call, per domain).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from mgs_megatron.megatron.state import unwrap


class _Boundary(torch.autograd.Function):
    """Identity; its backward runs `on_backward()` first (the start of this micro-batch's backward on the stage)."""

    @staticmethod
    def forward(ctx, x, on_backward):
        ctx.on_backward = on_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.on_backward()
        return grad, None


def _buffers(chunk):
    return list(chunk.buffers) + list(chunk.expert_parallel_buffers)


@contextlib.contextmanager
def one_schedule(mgs, order: Sequence[str]):
    """Run ONE schedule call inside: this rank's micro-batches in `order` (the domain of each, grouped by domain);
    leaves every declared domain reduced and stashed, ready for `mgs.step()`. Every rank enters it."""
    from mgs_megatron.megatron.mgs import MGSError

    if mgs._active is not None:
        raise MGSError(f"mgs.one_schedule() inside mgs.domain({mgs._active!r})")
    unknown = sorted(set(order) - set(mgs.domains))
    if unknown:
        raise MGSError(f"micro-batches of undeclared domain(s) {unknown}; declared: {mgs.domains}")
    runs = [d for i, d in enumerate(order) if i == 0 or order[i - 1] != d]
    if len(runs) != len(set(runs)):
        raise MGSError(f"mgs.one_schedule(): micro-batches must be grouped by domain, got the order {runs}")
    if any(c.ddp_config.overlap_grad_reduce for c in mgs.chunks):
        raise MGSError("mgs.one_schedule() needs overlap_grad_reduce=False (domains are reduced after the call)")
    for c in mgs.chunks:
        c.zero_grad_buffer()
    mgs.optimizer.zero_grad()
    saved: dict[str, list] = {}  # domain -> per chunk, per buffer: the unreduced local gradient
    seen = [0] * len(mgs.chunks)  # forward calls per chunk = micro-batch index

    def stash(ci: int, domain: str) -> None:
        per_chunk = saved.setdefault(domain, [None] * len(mgs.chunks))
        per_chunk[ci] = [b.grad_data.clone() for b in _buffers(mgs.chunks[ci])]
        for b in _buffers(mgs.chunks[ci]):
            b.grad_data.zero_()

    def mark(ci: int, module, inputs, output):
        j = seen[ci]
        seen[ci] += 1
        if j == 0 or j >= len(order) or order[j] == order[j - 1] or not torch.is_grad_enabled():
            return output
        return _Boundary.apply(output, lambda: stash(ci, order[j - 1]))

    config = mgs.chunks[0].config
    host = config.finalize_model_grads_func

    def record_tokens(model, num_tokens=None, *args, **kwargs):  # the schedule's finalize: reductions come after
        if num_tokens is not None:
            mgs._local_tokens += num_tokens.detach().to(mgs._local_tokens.device, torch.float64).sum()

    config.finalize_model_grads_func = record_tokens
    hooks = [unwrap(c).register_forward_hook(lambda m, i, o, ci=ci: mark(ci, m, i, o))
             for ci, c in enumerate(mgs.chunks)]
    try:
        yield mgs
    finally:
        for h in hooks:
            h.remove()
        if config.finalize_model_grads_func is record_tokens:
            config.finalize_model_grads_func = host
    if order:
        for ci in range(len(mgs.chunks)):
            stash(ci, order[-1])
    for d in mgs.domains:  # every rank, every declared domain, in the same order: each reduction is a collective
        with mgs.domain(d):
            for ci, per_buffer in enumerate(saved.get(d, [None] * len(mgs.chunks))):
                for b, g in zip(_buffers(mgs.chunks[ci]), per_buffer or []):
                    b.grad_data.copy_(g)
        saved.pop(d, None)


__all__ = ["one_schedule"]
