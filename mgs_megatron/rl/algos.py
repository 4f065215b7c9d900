"""GRPO as small pure functions with registries (in the style of verl's core_algos).

Shapes: per-sample tensors are [B]; per-token tensors are [B, T] with a float `mask` (1 = response token).
Everything here is plain torch and framework-free; the trainer composes:

    adv = compute_advantage("grpo", rewards, group_ids, norm_std=True)            # [B]
    keep = nonzero_variance_groups(rewards, group_ids)                             # [B] bool
    pg, pg_metrics = policy_loss("clip", logp, old_logp, adv[:, None] * mask, mask, clip_low, clip_high)  # [B, T]
    kl = kl_penalty("low_var_kl", logp, ref_logp)                                 # [B, T]
    per_token = pg + kl_coef * kl - entropy_coef * entropy
    num, count = loss_terms(per_token, mask, "seq-mean-token-mean")              # one micro-batch's share

Loss aggregation (verl's loss_agg_mode) is split into a numerator and a count per micro-batch: the step's loss is
sum(numerators) / sum(counts) over every micro-batch of every rank and domain, the count being tokens
("token-mean") or sequences ("seq-mean-*"). Megatron divides by the global count (calculate_per_token_loss), and so
does MGS for the sum of its per-domain gradients: rule "sum" is exactly the Mixed-RL step in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Literal, Sequence, Union, get_args

import torch

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES = get_args(LossAggMode)

ADVANTAGE_ESTIMATORS: Dict[str, Callable] = {}
POLICY_LOSSES: Dict[str, Callable] = {}
KL_ESTIMATORS: Dict[str, Callable] = {}


def _register(table: dict, name: str):
    def deco(fn):
        if name in table:
            raise ValueError(f"{name!r} is already registered ({table[name].__name__})")
        table[name] = fn
        return fn
    return deco


def register_advantage(name: str):
    return _register(ADVANTAGE_ESTIMATORS, name)


def register_policy_loss(name: str):
    return _register(POLICY_LOSSES, name)


def register_kl(name: str):
    return _register(KL_ESTIMATORS, name)


def _get(table: dict, kind: str, name: str):
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {sorted(table)}")
    return table[name]


@dataclass
class AlgoConfig:
    """The RL objective: advantages, policy loss, KL to the reference model, entropy bonus."""

    adv_estimator: str = "grpo"
    """Advantage estimator (registry ADVANTAGE_ESTIMATORS: 'grpo', 'rloo')."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group's reward std (Dr. GRPO: false)."""
    adv_eps: float = 1e-6
    """Added to the group std."""
    policy_loss: str = "clip"
    """Policy loss (registry POLICY_LOSSES: 'clip', PPO's clipped surrogate)."""
    clip_low: float = 0.2
    """Ratio clip below 1."""
    clip_high: float = 0.2
    """Ratio clip above 1 (DAPO's clip-higher when > clip_low)."""
    kl_coef: float = 0.001
    """Weight of the KL penalty to the frozen reference model (0: no reference model is built)."""
    kl_type: str = "low_var_kl"
    """KL estimator (registry KL_ESTIMATORS: 'low_var_kl' = 'k3', 'k1', 'abs', 'mse')."""
    entropy_coef: float = 0.001
    """Weight of the entropy bonus."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How token losses make the step's loss: 'token-mean' (over all tokens of the step), 'seq-mean-token-mean'
    (each sequence's token mean, averaged over the step's sequences: the paper's official code),
    'seq-mean-token-sum', 'seq-mean-token-sum-norm' (Dr. GRPO: token sums over a constant, the max response
    length). Every mode is normalised by the step's global count, so MGS rule 'sum' equals the Mixed step."""
    logprob_temperature: Union[float, Literal["rollout"]] = "rollout"
    """Log-probs, ratios, KL and entropy are of softmax(logits / T): 'rollout' = the rollout temperature (the
    distribution that was sampled, as the official code does); a number for another T (1.0 = raw logits)."""
    filter_zero_variance: bool = False
    """Drop groups whose rewards are all equal (they carry no GRPO signal)."""

    def __post_init__(self):
        for name, table in (("adv_estimator", ADVANTAGE_ESTIMATORS), ("policy_loss", POLICY_LOSSES),
                            ("kl_type", KL_ESTIMATORS)):
            if getattr(self, name) not in table:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {sorted(table)}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"clip_low={self.clip_low} / clip_high={self.clip_high} must be >= 0")
        if self.logprob_temperature != "rollout" and not self.logprob_temperature > 0:
            raise ValueError(f"logprob_temperature={self.logprob_temperature!r} must be > 0 or 'rollout'")


# ------------------------------------------------------------------------------------------------ helpers
def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    return (x * mask).sum() / (mask.sum() + eps) if eps else (x * mask).sum() / mask.sum().clamp_min(1.0)


def loss_terms(per_token: torch.Tensor, mask: torch.Tensor, mode: str, horizon: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, count) of one micro-batch [B, T] under `mode`; the loss over a step is sum(num) / sum(count).

      token-mean               sum_s sum_t l / (tokens)                      num = sum_s sum_t l,  count = tokens
      seq-mean-token-mean      (1/B) sum_s (1/|s|) sum_t l  (the paper's)    num = sum_s mean_t l, count = B
      seq-mean-token-sum       (1/B) sum_s sum_t l                           num = sum_s sum_t l,  count = B
      seq-mean-token-sum-norm  (1/B) sum_s sum_t l / horizon (Dr. GRPO)      num = sum_s sum_t l / horizon
    B counts sequences with at least one response token (padding rows do not count); horizon is a constant (the
    maximum response length), so the normaliser does not change during training.
    """
    if mode == "token-mean":
        return masked_sum(per_token, mask), mask.sum()
    seq_tokens = mask.sum(-1)
    seq_sum = (per_token * mask).sum(-1)
    count = (seq_tokens > 0).to(per_token.dtype).sum()
    if mode == "seq-mean-token-mean":
        return (seq_sum / seq_tokens.clamp_min(1.0)).sum(), count
    if mode == "seq-mean-token-sum":
        return seq_sum.sum(), count
    if mode == "seq-mean-token-sum-norm":
        return seq_sum.sum() / horizon, count
    raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {LOSS_AGG_MODES}")


def agg_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", horizon: int = 1
             ) -> torch.Tensor:
    """The aggregated loss of one (whole) batch: numerator / count of `loss_terms`."""
    num, count = loss_terms(per_token, mask, mode, horizon)
    return num / count.clamp_min(1.0)


def _group_index(group_ids: Sequence, device) -> tuple[torch.Tensor, int]:
    """Dense group index per sample (order of first appearance) and the number of groups."""
    ids: dict = {}
    idx = [ids.setdefault(g if not isinstance(g, torch.Tensor) else g.item(), len(ids)) for g in group_ids]
    return torch.tensor(idx, dtype=torch.long, device=device), len(ids)


def group_stats(scores: torch.Tensor, group_ids: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group mean, group std (unbiased, 0 for a group of one), group size)."""
    idx, n = _group_index(group_ids, scores.device)
    scores = scores.to(torch.float64)
    count = torch.zeros(n, dtype=torch.float64, device=scores.device).index_add_(0, idx, torch.ones_like(scores))
    mean = torch.zeros(n, dtype=torch.float64, device=scores.device).index_add_(0, idx, scores) / count
    sq = torch.zeros(n, dtype=torch.float64, device=scores.device).index_add_(0, idx, (scores - mean[idx]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp_min(1)).sqrt(), torch.zeros_like(sq))
    return mean[idx], std[idx], count[idx]


# ------------------------------------------------------------------------------------------------ advantages
@register_advantage("grpo")
def grpo_advantage(scores: torch.Tensor, group_ids: Sequence, *, norm_std: bool = True,
                   eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage: (r - mean_group) / (std_group + eps), or r - mean_group without std-normalisation.
    A group of one gets advantage 0 (verl convention)."""
    mean, std, count = group_stats(scores, group_ids)
    adv = scores.to(torch.float64) - mean
    if norm_std:
        adv = adv / (std + eps)
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return adv.to(torch.float32)


@register_advantage("rloo")
def rloo_advantage(scores: torch.Tensor, group_ids: Sequence, **_) -> torch.Tensor:
    """Leave-one-out baseline: r_i - mean_{j != i} r_j."""
    mean, _, count = group_stats(scores, group_ids)
    s = scores.to(torch.float64)
    adv = torch.where(count > 1, count / (count - 1).clamp_min(1) * (s - mean), torch.zeros_like(s))
    return adv.to(torch.float32)


def compute_advantage(name: str, scores: torch.Tensor, group_ids: Sequence, **kw) -> torch.Tensor:
    return _get(ADVANTAGE_ESTIMATORS, "advantage estimator", name)(scores, group_ids, **kw)


def nonzero_variance_groups(scores: torch.Tensor, group_ids: Sequence, tol: float = 0.0) -> torch.Tensor:
    """[B] bool: True where the sample's group has reward spread > tol (all-equal groups carry no GRPO signal
    and are dropped by `filter_groups` / DAPO's dynamic sampling)."""
    idx, n = _group_index(group_ids, scores.device)
    s = scores.to(torch.float64)
    hi = torch.full((n,), -float("inf"), dtype=torch.float64, device=s.device).scatter_reduce(0, idx, s, "amax")
    lo = torch.full((n,), float("inf"), dtype=torch.float64, device=s.device).scatter_reduce(0, idx, s, "amin")
    return (hi - lo)[idx] > tol


# ------------------------------------------------------------------------------------------------ policy loss
@register_policy_loss("clip")
def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip_low: float = 0.2, clip_high: float = 0.2):
    """PPO clipped surrogate with separate low/high clip (DAPO's clip-higher), per token.

    per token: -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A); returns (per-token loss [B, T],
    metrics) where metrics hold masked sums (clipfrac numerator, approx-KL numerator) to be reduced globally.
    """
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clipfrac = ((clipped > unclipped).to(per_token.dtype) * mask).sum()
    approx_kl = (-log_ratio * mask).sum()  # E_old[log old - log new] numerator
    return per_token, {"clipfrac_sum": clipfrac.detach(), "ppo_kl_sum": approx_kl.detach()}


def policy_loss(name: str, *args, **kw):
    return _get(POLICY_LOSSES, "policy loss", name)(*args, **kw)


# ------------------------------------------------------------------------------------------------ KL
@register_kl("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@register_kl("abs")
def kl_abs(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return (logp - ref_logp).abs()


@register_kl("mse")
def kl_mse(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("low_var_kl")
def kl_low_var(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, >= 0, clamped like verl."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(min=-clamp, max=clamp)


register_kl("k3")(kl_low_var)


def kl_penalty(name: str, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return _get(KL_ESTIMATORS, "KL estimator", name)(logp, ref_logp)


__all__ = ["AlgoConfig", "ADVANTAGE_ESTIMATORS", "POLICY_LOSSES", "KL_ESTIMATORS", "register_advantage",
           "register_policy_loss",
           "register_kl", "compute_advantage", "grpo_advantage", "rloo_advantage", "group_stats",
           "nonzero_variance_groups", "policy_loss", "clipped_policy_loss", "kl_penalty", "kl_low_var",
           "masked_sum", "masked_mean", "agg_loss", "loss_terms", "LOSS_AGG_MODES"]
