import sys
import textwrap
import time

import pytest

from mgs_megatron.rewards import (
    DomainRewardSpec,
    RewardConfig,
    RewardInput,
    RewardManager,
    build_reward,
    import_by_path,
)
from mgs_megatron.rewards.worker import ProcessPoolRunner


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mgs_user_rewards.py").write_text(textwrap.dedent("""
        import time
        def length(prompt, response, sample):
            return len(response) / 10
        def boom(prompt, response, sample):
            raise RuntimeError("broken reward")
        def hang_if_asked(prompt, response, sample):
            if response == "hang":
                time.sleep(600)
            return 1.0
        def nan(prompt, response, sample):
            return float("nan")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    yield "mgs_user_rewards"
    sys.modules.pop("mgs_user_rewards", None)


def test_dotted_paths(user_module):
    assert import_by_path(f"{user_module}:length") is import_by_path(f"{user_module}.length")
    r = build_reward(f"{user_module}:length")
    assert r.score_batch([RewardInput("p", "abcde")])[0].score == 0.5
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'"):
        build_reward("no_such_reward")


def test_raising_and_nan_reward_score_zero_and_are_counted(user_module):
    mgr = RewardManager({"x": DomainRewardSpec(f"{user_module}:boom"), "y": {"reward": f"{user_module}:nan"},
                         "ok": {"reward": f"{user_module}:length", "weight": 2.0}})
    items = [RewardInput("p", "r", {}, "x"), RewardInput("p", "abcde", {}, "ok"), RewardInput("p", "r", {}, "y"),
             RewardInput("p", "r", {}, "missing_domain")]
    res = mgr.score(items)
    assert res.scores == [0.0, 1.0, 0.0, 0.0]
    assert res.metrics["reward/x/failed"] == 1 and res.metrics["reward/y/failed"] == 1
    assert res.metrics["reward/ok/failed"] == 0 and res.metrics["reward/missing_domain/failed"] == 1
    mgr.score(items[:1])
    assert mgr.counters["reward/x/failed"] == 2 and mgr.counters["reward/x/count"] == 2


def test_hanging_reward_is_bounded_by_timeout(user_module):
    mgr = RewardManager(RewardConfig({"slow": DomainRewardSpec(
        "process_function", {"target": f"{user_module}:hang_if_asked", "timeout_s": 1.0})}))
    items = [RewardInput("p", r, {}, "slow") for r in ("a", "hang", "b", "hang", "c")]
    try:
        mgr.score(items[:1])  # worker start-up is not part of the timed part
        t0 = time.monotonic()
        res = mgr.score(items)
        elapsed = time.monotonic() - t0
    finally:
        mgr.close()
    assert res.scores == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert [o.status for o in res.outcomes] == ["ok", "timeout", "ok", "timeout", "ok"]
    assert res.metrics["reward/slow/timeout"] == 2 and res.metrics["reward/slow/failed"] == 0
    assert elapsed < 2 * 1.0 + 8  # two timeouts plus two worker restarts, not 600 s


def test_pool_with_two_workers_keeps_order(user_module):
    runner = ProcessPoolRunner(f"{user_module}:length", num_workers=2)
    try:
        outs = runner.run([("p", "x" * i, {}) for i in range(7)], timeout_s=5)
    finally:
        runner.close()
    assert [o.score for o in outs] == [i / 10 for i in range(7)]
