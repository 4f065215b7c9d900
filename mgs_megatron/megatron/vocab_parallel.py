"""Token log-probabilities and entropy from vocab-parallel logits, never the full vocabulary on one rank.

    logp, entropy = token_logprobs(logits, targets, vocab_size=V, temperature=T)     # both [b, s], fp32

`logits` [b, s, V_pad / tp] is this TP rank's shard of the output layer (Megatron's parallel_output; the vocabulary
is padded to a multiple of TP and columns >= V are excluded). The distribution is softmax(logits / T) over the real
vocabulary: with T = the rollout temperature, the one that was sampled. This is Megatron's vocab-parallel
cross-entropy idea: per chunk of tokens the max, the sum of exponentials, the sum of exp * z (for the entropy) and
the target's logit are reduced over TP (two all-reduces of a few numbers per token); nothing of size V leaves a
rank, and the fp32 temporaries are bounded by the chunk (`chunk_bytes`), not by the sequence.

Differentiable without storing fp32 vocabulary-sized tensors: the backward recomputes softmax(z) chunk by chunk
from the saved logits (in their own dtype) and the saved per-token log-normaliser and entropy,
    d logp_t / d z_v = [v = target_t] - p_v          d H_t / d z_v = -p_v (log p_v + H_t)
with z = logits / T (so d/d logits = d/d z / T). The backward needs no collective: each rank's columns are its own,
and Megatron's output layer reduces the hidden-state gradient over TP as usual. One implementation serves the
loss, the old / reference log-prob recomputation and validation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

CHUNK_BYTES = 256 << 20  # fp32 temporaries per chunk (two [chunk, V/tp] tensors, with headroom)


def chunk_tokens(local_vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that the fp32 [chunk, local_vocab] temporaries (two, plus headroom) fit in chunk_bytes."""
    return max(1, chunk_bytes // (12 * local_vocab))


def _scaled(logits: torch.Tensor, temperature: float, real: int) -> torch.Tensor:
    """z = logits / T over this rank's real columns (padding columns dropped), fp32, a fresh tensor."""
    z = logits[:, :real].to(torch.float32, copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _local_targets(targets: torch.Tensor, vocab_start: int, real: int):
    """(index into this rank's columns (clamped), whether the target lives on this rank)."""
    t = targets - vocab_start
    inside = (t >= 0) & (t < real)
    return t.clamp(0, max(real - 1, 0)), inside


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[i, j] b[i, j] without materialising the product."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, temperature, need_entropy, group, chunk):
        local = logits.shape[-1]
        flat, tgt = logits.reshape(-1, local), targets.reshape(-1)
        n, real = flat.shape[0], max(0, min(local, vocab_size - vocab_start))  # columns >= real are TP padding
        logz = torch.empty(n, dtype=torch.float32, device=flat.device)
        logp = torch.empty(n, dtype=torch.float32, device=flat.device)
        ent = torch.zeros(n, dtype=torch.float32, device=flat.device)
        reduce = group not in (None, False) and dist.get_world_size(group) > 1
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z = _scaled(flat[a:b], temperature, real)
            idx, inside = _local_targets(tgt[a:b], vocab_start, real)
            zt = torch.where(inside, z.gather(1, idx[:, None]).squeeze(1), 0.0) if real else \
                torch.zeros(b - a, device=flat.device)
            m = z.amax(-1) if real else torch.full((b - a,), float("-inf"), device=flat.device)
            if reduce:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            z.sub_(m[:, None])  # z - m: exp below cannot overflow
            e = torch.exp(z)
            sums = torch.stack([e.sum(-1), _rowdot(e, z) if need_entropy else torch.zeros_like(m), zt])
            del z, e
            if reduce:
                dist.all_reduce(sums, group=group)
            logz[a:b] = m + sums[0].log()
            logp[a:b] = sums[2] - logz[a:b]
            if need_entropy:  # H = log Z - E[z] = log sum exp(z - m) - E[z - m]
                ent[a:b] = sums[0].log() - sums[1] / sums[0]
        ctx.save_for_backward(logits, targets, logz, ent)
        ctx.args = (vocab_start, real, temperature, need_entropy, chunk)
        shape = logits.shape[:-1]
        return logp.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, logz, ent = ctx.saved_tensors
        vocab_start, real, temperature, need_entropy, chunk = ctx.args
        local = logits.shape[-1]
        flat, tgt = logits.reshape(-1, local), targets.reshape(-1)
        n = flat.shape[0]
        g_logp = g_logp.reshape(-1).float() if g_logp is not None else torch.zeros_like(logz)
        g_ent = g_ent.reshape(-1).float() if (g_ent is not None and need_entropy) else torch.zeros_like(logz)
        grad = torch.zeros_like(flat)  # padding columns keep 0
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            if not real:
                continue
            # d/dz_v = p_v (-(g_logp + g_ent H) - g_ent log p_v), plus g_logp at the target
            logq = _scaled(flat[a:b], temperature, real).sub_(logz[a:b, None])
            p = torch.exp(logq)
            ge = g_ent[a:b, None]
            logq.mul_(-ge).sub_(g_logp[a:b, None] + ge * ent[a:b, None]).mul_(p)
            del p
            idx, inside = _local_targets(tgt[a:b], vocab_start, real)
            logq.scatter_add_(1, idx[:, None], torch.where(inside, g_logp[a:b], 0.0)[:, None])
            if temperature != 1.0:
                logq.div_(temperature)
            grad[a:b, :real] = logq.to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_size: int, temperature: float = 1.0,
                   need_entropy: bool = True, group=None, vocab_start: Optional[int] = None,
                   chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) per position, fp32, from this rank's vocab shard of the logits; see the module doc.

    group / vocab_start default to Megatron's tensor-parallel group and this rank's first column (group=False: no
    reduction, the whole vocabulary is local). Entropy is zeros (and not differentiated) when need_entropy is False.
    """
    if group is None or vocab_start is None:
        from megatron.core import parallel_state as ps

        if group is None and ps.model_parallel_is_initialized():
            group = ps.get_tensor_model_parallel_group()
        if vocab_start is None:
            rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
            vocab_start = rank * logits.shape[-1]
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 for log-probabilities")
    return _TokenLogprobs.apply(logits, targets, int(vocab_start), int(vocab_size), float(temperature),
                                bool(need_entropy), group, chunk_tokens(logits.shape[-1], chunk_bytes))


__all__ = ["CHUNK_BYTES", "chunk_tokens", "token_logprobs"]
