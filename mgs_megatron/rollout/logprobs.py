"""The rollout engine's log-probs against Megatron's: rollout/logprob_diff_{max,mean}.

Megatron's side is megatron.forward.sequence_logprobs (the live model, any TP/PP, vocab-parallel), under the same
distribution the engine reports (softmax(logits / T) when both use the rollout temperature). A failed or stale
weight sync shows here first.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from mgs_megatron.devices import HOST, collective_device
from mgs_megatron.megatron.forward import sequence_logprobs
from mgs_megatron.rollout.config import Rollout


def rollout_logprobs(chunks, rollouts: Sequence[Rollout], vocab_size: int, **kw) -> list[torch.Tensor]:
    """Megatron's logprobs of each rollout's response tokens (host fp32 tensors, on every rank)."""
    return sequence_logprobs(chunks, [r.sequence for r in rollouts], [len(r.prompt_ids) for r in rollouts],
                             vocab_size, **kw)


def logprob_diff(rollouts: Sequence[Rollout], megatron_logprobs: Sequence[torch.Tensor]) -> dict[str, float]:
    """rollout/logprob_diff_{max,mean}: |engine - Megatron| over every sampled token (host side)."""
    diffs = [(torch.tensor(r.response_logprobs, dtype=torch.float32, device=HOST) - m.to(HOST).float()).abs()
             for r, m in zip(rollouts, megatron_logprobs) if r.response_ids]
    if not diffs:
        return {"rollout/logprob_diff_max": 0.0, "rollout/logprob_diff_mean": 0.0, "rollout/logprob_tokens": 0.0}
    d = torch.cat(diffs)
    return {"rollout/logprob_diff_max": d.max().item(), "rollout/logprob_diff_mean": d.mean().item(),
            "rollout/logprob_tokens": float(d.numel())}


def logprob_diff_over_ranks(rollouts: Sequence[Rollout], megatron_logprobs: Sequence[torch.Tensor]) -> dict:
    """logprob_diff of this rank's rollouts, reduced over all ranks: the max, and the token-weighted mean (TP/PP
    peers hold copies of their DP share, which weighs every share equally: the mean is unchanged)."""
    diff = logprob_diff(rollouts, megatron_logprobs)
    n = diff["rollout/logprob_tokens"]
    dev = collective_device()
    red = torch.tensor([diff["rollout/logprob_diff_mean"] * n, n], dtype=torch.float64, device=dev)
    dist.all_reduce(red)
    mx = torch.tensor([diff["rollout/logprob_diff_max"]], dtype=torch.float64, device=dev)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    return {"rollout/logprob_diff_max": float(mx[0]),
            "rollout/logprob_diff_mean": float(red[0] / red[1].clamp_min(1.0))}


__all__ = ["logprob_diff", "logprob_diff_over_ranks", "rollout_logprobs"]
