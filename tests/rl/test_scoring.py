"""rl/scoring.py: a step's rollouts scored over the ranks; a reward with placement "node" (the chat reward model) is
built and run on one rank per node only (LOCAL_RANK 0), and every rank still gets every score, in order."""

from __future__ import annotations

import os

import pytest

from mgs_megatron.data.schema import PromptSample
from mgs_megatron.rewards.base import REWARD_REGISTRY, Reward, register_reward
from mgs_megatron.rollout.config import Rollout
from mgs_megatron.testing.harness import run_distributed


class PerNodeModel(Reward):
    placement = "node"
    built = 0

    def __init__(self):
        type(self).built += 1

    def score_one(self, item):
        return 100.0 + len(item.response)


class PerRank(Reward):
    built = 0

    def __init__(self):
        type(self).built += 1

    def score_one(self, item):
        return float(len(item.response))


def _score(local_ranks):
    import torch.distributed as dist

    from mgs_megatron.rewards import RewardManager
    from mgs_megatron.rl.scoring import score_rollouts

    for name, cls in (("test-per-node", PerNodeModel), ("test-per-rank", PerRank)):
        if name not in REWARD_REGISTRY:  # the harness keeps its rank processes between calls
            register_reward(name)(cls)
        cls.built = 0
    os.environ["LOCAL_RANK"] = str(local_ranks[dist.get_rank()])
    prompts = [PromptSample(f"p{i}", d, f"prompt {i}", None) for i, d in enumerate(["chat", "math", "chat", "math",
                                                                                    "chat"])]
    rollouts = [Rollout([1], [2], [0.0], "x" * (3 * i + k), "stop", i, k) for i in range(len(prompts)) for k in (0, 1)]
    rewards = RewardManager({"chat": {"reward": "test-per-node"}, "math": {"reward": "test-per-rank"}})
    scores = score_rollouts(rewards, prompts, rollouts).scores
    return scores, PerNodeModel.built, PerRank.built


@pytest.mark.parametrize("local_ranks, node_models", [((0, 1), [1, 0]), ((0, 0), [1, 1])])
def test_reward_model_once_per_node(local_ranks, node_models):
    """One node of two ranks: only rank 0 builds the reward model; two nodes of one rank: each builds one."""
    want = [(100.0 if i % 2 == 0 else 0.0) + 3 * i + k for i in range(5) for k in (0, 1)]  # chat at even prompts
    out = run_distributed(_score, 2, local_ranks)
    assert [o[0] for o in out] == [want, want]
    assert [o[1] for o in out] == node_models
    assert [o[2] for o in out] == [1, 1]  # the per-rank reward: math items on both ranks
