"""Scoring a step's rollouts with the domains' rewards, split over the ranks and all-gathered.

A reward that holds a model (class attribute `placement = "node"`: the chat reward model) is scored on one rank per
node (LOCAL_RANK 0) only, so that each node loads it once instead of once per GPU (an 8B bf16 reward model is
~16 GB: 7 x 16 GB saved on an 8-GPU node); that rank scores its node's share of those items and the scores reach
every rank with the same all-gather as the others'.
"""

from __future__ import annotations

import os
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
    """One outcome per rollout, on every rank: each rank scores its share (rewards may be slow: math workers, a
    reward model; a per-node reward's items go to the node leaders only), then the shares are all-gathered."""
    world, rank = dist.get_world_size(), dist.get_rank()
    domains = [prompts[ro.prompt_index].domain for ro in rollouts]
    per_node = {d for d in set(domains) if placement(rewards, d) == "node"}
    leaders = node_leaders()
    mine = _share([i for i, d in enumerate(domains) if d not in per_node], world, rank)
    if rank in leaders:
        mine += _share([i for i, d in enumerate(domains) if d in per_node], len(leaders), leaders.index(rank))
    items = [RewardInput(prompt=prompts[rollouts[i].prompt_index].as_messages(), response=rollouts[i].text,
                         sample=prompts[rollouts[i].prompt_index].fields, domain=domains[i]) for i in mine]
    outcomes = rewards.score(items).outcomes if items else []
    parts: list = [None] * world
    dist.all_gather_object(parts, (mine, outcomes))
    out: list = [None] * len(rollouts)
    for idx, part in parts:
        for i, o in zip(idx, part):
            out[i] = o
    return ScoredRollouts(out, domains)


def _share(indices: list[int], parts: int, part: int) -> list[int]:
    lo, hi = split_range(len(indices), parts, part)
    return indices[lo:hi]


def placement(rewards: RewardManager, domain: str) -> str:
    """'node' if the domain's reward is one copy per node (a registered class with placement = "node"), else
    'rank'. Decided from the config, without building the reward (that would load the model)."""
    from mgs_megatron.rewards import chat_rm  # noqa: F401 - registers the reward model
    from mgs_megatron.rewards.base import DOMAIN_DEFAULTS, REWARD_REGISTRY

    spec = rewards.config.domains.get(domain)
    name = spec.reward if spec is not None else domain
    return getattr(REWARD_REGISTRY.get(DOMAIN_DEFAULTS.get(name, name)), "placement", "rank")


def node_leaders() -> list[int]:
    """Global ranks with LOCAL_RANK 0 (one per node), ascending."""
    local: list = [None] * dist.get_world_size()
    dist.all_gather_object(local, int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return [r for r, lr in enumerate(local) if lr == 0]


__all__ = ["ScoredRollouts", "node_leaders", "placement", "score_rollouts"]
