"""Per-domain reward dispatch with failure/timeout accounting.

`RewardManager.score(items)` groups items by `item.domain`, scores each group with that domain's reward in one
batched call, and returns scores in input order plus metrics:
  reward/<domain>/mean, reward/<domain>/count, reward/<domain>/failed, reward/<domain>/timeout
(per call), while `manager.counters` accumulates failed/timeout/count over the whole run. Nothing in `score` raises
for a bad reward: failures and timeouts score 0 and are counted and logged.

`RewardManager.check_step(domains, outcomes)` is the trainer's view of one step (every rank's outcomes): the step's
failed / timeout counts per domain, and a `RewardError` carrying the reward's own error once a domain has failed on
every item for `max_failed_steps` consecutive steps (a run that would otherwise train on zeros and exit 0).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from mgs_megatron.errors import RewardError

from .base import (
    DEFAULT_TIMEOUT_S,
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
    """One domain's reward (the trainer's `rewards.domains.<domain>` entries)."""

    reward: str
    """A registered name ("math_verify", "ifeval", "reward_model", "process_function"), a domain name (its
    default reward) or a dotted path "pkg.module:fn" to a user reward."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the reward's constructor or factory (e.g. model_path for the reward model)."""
    weight: float = 1.0
    """Multiplies the domain's scores."""


@dataclass
class RewardConfig:
    """How each domain is scored, and what a failing reward does to the run. One section for the reward stage as a
    whole (the deadline and the stop rule apply to every domain alike); one DomainRewardSpec per domain."""

    domains: dict[str, DomainRewardSpec] = field(default_factory=dict)
    """Reward per domain; math, if and chat have defaults (math_verify, ifeval, reward_model)."""
    timeout_s: Optional[float] = DEFAULT_TIMEOUT_S
    """Per-item deadline in seconds of math_verify and of user functions given by dotted path: each item runs in a
    worker process, killed at the deadline; the item scores 0 and counts in reward/<domain>/timeout (null: user
    functions run in the trainer's process without a deadline)."""
    max_failed_steps: int = 3
    """Stop the run with the reward's own error once a domain's reward failed (raised, returned NaN, timed out) on
    every item of this many consecutive steps (0: never stop). A single bad item scores 0 and counts in
    reward/<domain>/failed."""

    def __post_init__(self):
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0 (or null: no deadline)")
        if self.max_failed_steps < 0:
            raise ValueError(f"max_failed_steps={self.max_failed_steps} must be >= 0")

    def spec(self, domain: str) -> DomainRewardSpec:
        """The domain's reward: its entry, or the domain's default reward (by its name)."""
        return self.domains.get(domain) or DomainRewardSpec(domain)


@dataclass
class RewardBatchResult:
    scores: list[float]
    outcomes: list[ScoreOutcome]
    metrics: dict[str, float]


class RewardManager:
    def __init__(self, config: RewardConfig | dict, rewards: dict[str, Reward] | None = None, domains=()):
        """`config`: a RewardConfig, or {domain: DomainRewardSpec or its dict}. `domains`: domains scored with their
        default reward when the config has no entry for them. `rewards` lets callers pass ready Reward objects
        (tests, shared models) instead of building them."""
        if isinstance(config, dict):
            config = RewardConfig({d: s if isinstance(s, DomainRewardSpec) else DomainRewardSpec(**s)
                                   for d, s in config.items()})
        self.config = dataclasses.replace(config, domains={**{d: config.spec(d) for d in domains}, **config.domains})
        self._rewards: dict[str, Reward] = dict(rewards or {})
        self.counters: dict[str, float] = defaultdict(float)
        self._failed_streak: dict[str, int] = defaultdict(int)

    def reward_for(self, domain: str) -> Reward:
        if domain not in self._rewards:
            spec = self.config.domains.get(domain)
            if spec is None:
                raise KeyError(f"no reward configured for domain {domain!r}")
            self._rewards[domain] = build_reward(spec.reward, item_timeout_s=self.config.timeout_s, **spec.kwargs)
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
                logger.warning("reward/%s: %d failed, %d timed out of %d (first: %s)",
                               domain, n_fail, n_to, len(outs), first)
            p = f"reward/{domain}"
            metrics.update({f"{p}/mean": sum(o.score * w for o in outs) / len(outs), f"{p}/count": len(outs),
                            f"{p}/failed": n_fail, f"{p}/timeout": n_to})
            for k in ("count", "failed", "timeout"):
                self.counters[f"{p}/{k}"] += metrics[f"{p}/{k}"]
        final = [o for o in outcomes if o is not None]
        return RewardBatchResult([o.score for o in final], final, metrics)

    def check_step(self, domains: Sequence[str], outcomes: Sequence[ScoreOutcome]) -> dict[str, float]:
        """One training step's outcomes over all ranks (`domains[i]` is outcome i's domain): reward/<d>/failed and
        reward/<d>/timeout per domain. Raises RewardError (the reward's own first error) once a domain failed or
        timed out on every item for config.max_failed_steps consecutive steps. Every rank sees the same outcomes,
        so every rank stops at the same step."""
        by_domain: dict[str, list[ScoreOutcome]] = defaultdict(list)
        for d, o in zip(domains, outcomes):
            by_domain[d].append(o)
        metrics: dict[str, float] = {}
        for d, outs in by_domain.items():
            bad = [o for o in outs if o.status in (FAILED, TIMEOUT)]
            metrics[f"reward/{d}/failed"] = float(sum(o.status == FAILED for o in outs))
            metrics[f"reward/{d}/timeout"] = float(sum(o.status == TIMEOUT for o in outs))
            self._failed_streak[d] = self._failed_streak[d] + 1 if len(bad) == len(outs) else 0
            limit = self.config.max_failed_steps
            if limit and self._failed_streak[d] >= limit:
                spec = self.config.spec(d)
                raise RewardError(f"the reward of domain {d!r} ({spec.reward}) failed on all {len(outs)} items of "
                                  f"{limit} consecutive steps (rewards.max_failed_steps={limit}); its error: "
                                  f"{bad[0].error}")
        return metrics

    def close(self) -> None:
        for r in self._rewards.values():
            r.close()
