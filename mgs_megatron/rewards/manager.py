"""Per-domain reward dispatch with failure/timeout accounting.

`RewardManager.score(items)` groups items by `item.domain`, scores each group with that domain's reward in one
batched call, and returns scores in input order plus metrics:
  reward/<domain>/mean, reward/<domain>/count, reward/<domain>/failures, reward/<domain>/timeouts
(per call), while `manager.counters` accumulates failures/timeouts/count over the whole run.
Nothing here raises for a bad reward: failures and timeouts score 0 and are counted and logged.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from .base import (
    FAILED,
    TIMEOUT,
    Reward,
    RewardInput,
    ScoreOutcome,
    build_reward,
    reward_has_accuracy,
    safe_score_batch,
)

logger = logging.getLogger(__name__)


@dataclass
class DomainRewardSpec:
    """One domain's reward (the trainer's `rewards.<domain>` entries)."""

    reward: str
    """A registered name ("math_verify", "ifeval", "reward_model", "process_function"), a domain name (its
    default reward) or a dotted path "pkg.module:fn" to a user reward."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the reward's constructor or factory (e.g. model_path for the reward model)."""
    weight: float = 1.0
    """Multiplies the domain's scores."""


@dataclass
class RewardConfig:
    domains: dict[str, DomainRewardSpec] = field(default_factory=dict)


@dataclass
class RewardBatchResult:
    scores: list[float]
    outcomes: list[ScoreOutcome]
    metrics: dict[str, float]


class RewardManager:
    def __init__(self, config: RewardConfig | dict, rewards: dict[str, Reward] | None = None):
        """`rewards` lets callers pass ready Reward objects (tests, shared models) instead of building them."""
        if isinstance(config, dict):
            config = RewardConfig({d: s if isinstance(s, DomainRewardSpec) else DomainRewardSpec(**s)
                                   for d, s in config.items()})
        self.config = config
        self._rewards: dict[str, Reward] = dict(rewards or {})
        self.counters: dict[str, float] = defaultdict(float)

    def reward_for(self, domain: str) -> Reward:
        if domain not in self._rewards:
            spec = self.config.domains.get(domain)
            if spec is None:
                raise KeyError(f"no reward configured for domain {domain!r}")
            self._rewards[domain] = build_reward(spec.reward, **spec.kwargs)
        return self._rewards[domain]

    def accuracy_threshold(self, domain: str) -> float | None:
        """The score that means "correct" for this domain (its weight), or None where accuracy is not defined."""
        spec = self.config.domains.get(domain)
        if spec is None or not reward_has_accuracy(spec.reward):
            return None
        return spec.weight

    def score(self, items: Sequence[RewardInput]) -> RewardBatchResult:
        by_domain: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            by_domain[it.domain].append(i)
        outcomes: list[ScoreOutcome | None] = [None] * len(items)
        metrics: dict[str, float] = {}
        for domain, idx in by_domain.items():
            group = [items[i] for i in idx]
            try:
                reward = self.reward_for(domain)
                outs = safe_score_batch(reward, group)
            except Exception as e:  # e.g. the reward model cannot be built: still no crash
                logger.error("reward for domain %r unavailable: %s", domain, e)
                outs = [ScoreOutcome(0.0, FAILED, f"{type(e).__name__}: {e}") for _ in group]
            spec = self.config.domains.get(domain)
            w = spec.weight if spec else 1.0
            for i, o in zip(idx, outs):
                outcomes[i] = ScoreOutcome(o.score * w, o.status, o.error)
            n_fail = sum(o.status == FAILED for o in outs)
            n_to = sum(o.status == TIMEOUT for o in outs)
            if n_fail or n_to:
                first = next(o.error for o in outs if o.status in (FAILED, TIMEOUT))
                logger.warning("reward/%s: %d failures, %d timeouts of %d (first: %s)",
                               domain, n_fail, n_to, len(outs), first)
            p = f"reward/{domain}"
            metrics.update({f"{p}/mean": sum(o.score * w for o in outs) / len(outs), f"{p}/count": len(outs),
                            f"{p}/failures": n_fail, f"{p}/timeouts": n_to})
            for k in ("count", "failures", "timeouts"):
                self.counters[f"{p}/{k}"] += metrics[f"{p}/{k}"]
        final = [o for o in outcomes if o is not None]
        return RewardBatchResult([o.score for o in final], final, metrics)

    def close(self) -> None:
        for r in self._rewards.values():
            r.close()
