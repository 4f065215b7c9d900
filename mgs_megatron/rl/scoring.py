"""Scoring a step's rollouts with the domains' rewards, split over every rank and all-gathered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist

from mgs_megatron.rewards import RewardInput, RewardManager, ScoreOutcome
from mgs_megatron.rollout.distribute import split_range


@dataclass
class ScoredRollouts:
    """Every rollout's outcome (score, status ok / failed / timeout, error) and domain, in rollout order."""

    outcomes: list[ScoreOutcome]
    domains: list[str]

    @property
    def scores(self) -> list[float]:
        return [o.score for o in self.outcomes]


def score_rollouts(rewards: RewardManager, prompts: Sequence, rollouts: Sequence) -> ScoredRollouts:
    """One outcome per rollout, on every rank: each rank scores a contiguous share (rewards may be slow: math
    workers, a reward model), then the shares are all-gathered in rank order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    lo, hi = split_range(len(rollouts), world, rank)
    items = [RewardInput(prompt=prompts[ro.prompt_index].as_messages(), response=ro.text,
                         sample=prompts[ro.prompt_index].fields, domain=prompts[ro.prompt_index].domain)
             for ro in rollouts[lo:hi]]
    mine = rewards.score(items).outcomes if items else []
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return ScoredRollouts([o for p in parts for o in p], [prompts[ro.prompt_index].domain for ro in rollouts])


__all__ = ["ScoredRollouts", "score_rollouts"]
