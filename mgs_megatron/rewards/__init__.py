"""Rewards for multi-domain RL: math (math-verify), instruction following (IFEval checkers), chat (reward
model), and user rewards by dotted path. See base.py for the interface and registry."""
from .base import (
                   DEFAULT_TIMEOUT_S,
                   DOMAIN_DEFAULTS,
                   FAILED,
                   OK,
                   REWARD_REGISTRY,
                   TIMEOUT,
                   FunctionReward,
                   Reward,
                   RewardInput,
                   ScoreOutcome,
                   build_reward,
                   import_by_path,
                   register_reward,
                   resolve_reward,
                   safe_score_batch,
                   unknown_kwargs,
)
from .manager import DomainRewardSpec, RewardBatchResult, RewardConfig, RewardManager

__all__ = ["DEFAULT_TIMEOUT_S", "DOMAIN_DEFAULTS", "FAILED", "OK", "REWARD_REGISTRY", "TIMEOUT", "FunctionReward",
           "Reward", "RewardInput", "ScoreOutcome", "build_reward", "import_by_path", "register_reward",
           "resolve_reward", "safe_score_batch", "unknown_kwargs", "DomainRewardSpec", "RewardBatchResult",
           "RewardConfig", "RewardManager"]
