"""From one step's scored rollouts to this rank's training micro-batches.

    samples = score_samples(prompts, rollouts, scores, algo)          # advantages, kept samples, domains
    plan = rank_plan(samples, micro_batch_size, dp, dp_rank, domains)  # this DP rank's domain-pure micro-batches
    groups = pack_plan(samples, plan, old_logp, ref_logp, ...)         # {domain: [batch dict]} for the schedule

Pure functions of their inputs (no process group), on the host (the schedule moves each micro-batch to the compute
device); the trainer adds the log-prob recomputation between them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from mgs_megatron.data import MicroBatch, plan_microbatches
from mgs_megatron.devices import HOST
from mgs_megatron.megatron.schedule import pack_sequences
from mgs_megatron.rl import algos


@dataclass
class StepSamples:
    """One step's rollouts with their rewards: every field is indexed like `rollouts`, except `keep` (indices of
    the samples that train)."""

    rollouts: list
    domains: list[str]
    scores: torch.Tensor
    advantages: torch.Tensor
    keep: list[int]


def score_samples(prompts: Sequence, rollouts: Sequence, scores: Sequence[float], algo) -> StepSamples:
    """GRPO advantages per prompt group; groups with no reward spread dropped when algo.filter_zero_variance."""
    r = torch.tensor(list(scores), dtype=torch.float32, device=HOST)
    groups = [ro.prompt_index for ro in rollouts]
    adv = algos.compute_advantage(algo.adv_estimator, r, groups, norm_std=algo.norm_adv_by_std, eps=algo.adv_eps)
    keep = list(range(len(rollouts)))
    if algo.filter_zero_variance:
        mask = algos.nonzero_variance_groups(r, groups)
        keep = [i for i in keep if mask[i]]
    return StepSamples(list(rollouts), [prompts[ro.prompt_index].domain for ro in rollouts], r, adv, keep)


def rank_plan(samples: StepSamples, micro_batch_size: int, dp: int, dp_rank: int,
              domain_order: Sequence[str]) -> list[MicroBatch]:
    """This DP rank's domain-pure micro-batches; their `indices` point into `samples.rollouts`."""
    kept_domains = [samples.domains[i] for i in samples.keep]
    plan = plan_microbatches(kept_domains, micro_batch_size, dp, domain_order=domain_order)[dp_rank]
    return [MicroBatch(mb.domain, [samples.keep[j] for j in mb.indices]) for mb in plan]


def pack_plan(samples: StepSamples, plan: Sequence[MicroBatch], old_logp: Sequence[torch.Tensor],
              ref_logp: Sequence[torch.Tensor], *, micro_batch_size: int, pad: int) -> dict:
    """{domain: [batch dict]} in plan order, host tensors. `old_logp` / `ref_logp` hold one tensor per sample of
    the plan, in plan order. Batch tensors: tokens, targets, loss_mask, advantages, old_logp, ref_logp, all
    [micro_batch_size, L] with L the micro-batch's own longest sequence - 1 (padding the whole step to its longest
    sequence would spend the compute of the longest response on every micro-batch)."""
    out: dict = defaultdict(list)
    k = 0
    for mb in plan:
        rows = [samples.rollouts[i] for i in mb.indices]
        seq_len = max((len(ro.sequence) for ro in rows), default=2) - 1
        b = pack_sequences([(ro.sequence, len(ro.prompt_ids)) for ro in rows], micro_batch_size, seq_len, pad)
        b.update({name: torch.zeros(micro_batch_size, seq_len, device=HOST)
                  for name in ("advantages", "old_logp", "ref_logp")})
        for row, (i, ro) in enumerate(zip(mb.indices, rows)):
            L, P = len(ro.sequence), len(ro.prompt_ids)
            b["advantages"][row, P - 1:L - 1] = float(samples.advantages[i])
            if L > P:
                b["old_logp"][row, P - 1:L - 1] = old_logp[k].float()
                b["ref_logp"][row, P - 1:L - 1] = ref_logp[k].float()
            k += 1
        out[mb.domain].append(b)
    return dict(out)


__all__ = ["StepSamples", "pack_plan", "rank_plan", "score_samples"]
