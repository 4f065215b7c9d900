"""Megatron's per-token logprobs of given sequences (the live model, any TP/PP) and the vLLM-vs-Megatron diff.

The forward goes through megatron.forward.megatron_logits (Megatron's pipeline schedule; TP-sharded vocab is
gathered and the padding stripped, so the softmax is over the real vocabulary exactly as vLLM's), then an fp32
log_softmax and a gather of each response token's logprob at the position before it. Sequences are right-padded
(causal attention: padding never influences earlier positions).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.rollout.config import Rollout


@torch.no_grad()
def megatron_token_logprobs(chunks: Sequence[torch.nn.Module], sequences: Sequence[Sequence[int]],
                            prompt_lens: Sequence[int], vocab_size: int, *, micro_batch_size: int = 8,
                            pad_id: int = 0) -> list[torch.Tensor]:
    """logprob of sequences[i][t] given sequences[i][:t], for t in [prompt_lens[i], len); fp32, on every rank."""
    from megatron.core import parallel_state as ps

    from mgs_megatron.megatron.forward import megatron_logits

    modes = [m.training for m in chunks]
    out: list[Optional[torch.Tensor]] = []
    try:
        for start in range(0, len(sequences), micro_batch_size):
            seqs = sequences[start:start + micro_batch_size]
            plens = prompt_lens[start:start + micro_batch_size]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            logits = megatron_logits(chunks, ids, vocab_size)
            if logits is None:  # not the last pipeline stage
                out += [None] * len(seqs)
                continue
            logp = torch.log_softmax(logits.float(), dim=-1)
            for i, (s, p) in enumerate(zip(seqs, plens)):
                targets = ids[i, p:len(s)]
                out.append(logp[i, p - 1:len(s) - 1].gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    finally:
        for m, mode in zip(chunks, modes):
            m.train(mode)
    if ps.get_pipeline_model_parallel_world_size() > 1:  # the last stage has them; share with the others
        group = ps.get_pipeline_model_parallel_group()
        box = [out]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, ps.get_pipeline_model_parallel_world_size()
                                                                  - 1), group=group)
        out = box[0]
    return out


def rollout_logprobs(chunks, rollouts: Sequence[Rollout], vocab_size: int, **kw) -> list[torch.Tensor]:
    """Megatron's logprobs of each rollout's response tokens."""
    return megatron_token_logprobs(chunks, [r.sequence for r in rollouts], [len(r.prompt_ids) for r in rollouts],
                                   vocab_size, **kw)


def logprob_diff_over_ranks(rollouts: Sequence[Rollout], megatron_logprobs: Sequence[torch.Tensor]) -> dict:
    """logprob_diff of this rank's rollouts, reduced over all ranks: the max, and the token-weighted mean (TP/PP
    peers hold copies of their DP share, which weighs every share equally: the mean is unchanged)."""
    diff = logprob_diff(rollouts, megatron_logprobs)
    n = diff["rollout/logprob_tokens"]
    red = torch.tensor([diff["rollout/logprob_diff_mean"] * n, n], dtype=torch.float64)
    dist.all_reduce(red)
    mx = torch.tensor([diff["rollout/logprob_diff_max"]], dtype=torch.float64)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    return {"rollout/logprob_diff_max": float(mx[0]),
            "rollout/logprob_diff_mean": float(red[0] / red[1].clamp_min(1.0))}


def logprob_diff(rollouts: Sequence[Rollout], megatron_logprobs: Sequence[torch.Tensor]) -> dict[str, float]:
    """rollout/logprob_diff_{max,mean}: |vLLM - Megatron| over every sampled token."""
    diffs = [(torch.tensor(r.response_logprobs, dtype=torch.float32) - m.float()).abs()
             for r, m in zip(rollouts, megatron_logprobs) if r.response_ids]
    if not diffs:
        return {"rollout/logprob_diff_max": 0.0, "rollout/logprob_diff_mean": 0.0, "rollout/logprob_tokens": 0.0}
    d = torch.cat(diffs)
    return {"rollout/logprob_diff_max": d.max().item(), "rollout/logprob_diff_mean": d.mean().item(),
            "rollout/logprob_tokens": float(d.numel())}
