"""Issue 16, items 1-4: rewards that would train on nothing and exit 0 are caught (up front, or by the run)."""
import json
import re
import subprocess
import sys
import textwrap
import time

import pytest

from mgs_megatron.errors import RewardError
from mgs_megatron.rewards import DomainRewardSpec, RewardConfig, RewardInput, RewardManager, ScoreOutcome
from mgs_megatron.rl.cli import main
from mgs_megatron.rl.config import ConfigError, check_paths, load_config
from tests.reliability.conftest import ROOT, base_overrides, mgs_train

TINY = ROOT / "examples" / "tiny_cpu.yaml"


# ------------------------------------------------------------------------------------------------ 1
@pytest.mark.parametrize("reward, why", [
    ("foo", "unknown reward 'foo'"),
    ("no_such_pkg.rewards:score", "cannot be imported: ModuleNotFoundError"),
    ("mgs_rel_rewards:no_such_fn", "cannot be imported: AttributeError"),
])
def test_unresolvable_reward_is_a_config_error_before_launch(tmp_path, toy, user_rewards, capsys, reward, why):
    ov = base_overrides(toy, tmp_path / "o") + [f"rewards.domains.math.reward={reward}"]
    with pytest.raises(ConfigError, match=re.escape("'rewards.domains.math.reward'") + ".*" + re.escape(why)):
        check_paths(load_config(TINY, ov))
    assert main([str(TINY), *ov]) == 2  # the CLI: one line, exit 2, nothing started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mgs-train: config error:") and why in err[0]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_misspelt_reward_kwarg_is_a_config_error_before_launch(tmp_path, toy):
    ov = base_overrides(toy, tmp_path / "o") + ["rewards.domains.math.kwargs.extration=hf_math_verify"]
    with pytest.raises(ConfigError, match=re.escape("'rewards.domains.math.kwargs.extration'") + ".*takes no"):
        check_paths(load_config(TINY, ov))


# ------------------------------------------------------------------------------------------------ 2
def _step(manager, domain, outcomes):
    return manager.check_step([domain] * len(outcomes), outcomes)


def test_failing_reward_is_counted_and_stops_after_max_failed_steps(user_rewards):
    cfg = RewardConfig({"x": DomainRewardSpec(f"{user_rewards}:boom"), "y": DomainRewardSpec(f"{user_rewards}:nan")},
                       timeout_s=None, max_failed_steps=2)
    mgr = RewardManager(cfg)
    items = [RewardInput("p", "r", {}, d) for d in ("x", "y", "x")]
    res = mgr.score(items)
    assert res.scores == [0.0, 0.0, 0.0] and [o.status for o in res.outcomes] == ["failed"] * 3
    m = mgr.check_step(["x", "y", "x"], res.outcomes)
    assert m == {"reward/x/failed": 2.0, "reward/x/timeout": 0.0, "reward/y/failed": 1.0, "reward/y/timeout": 0.0}
    with pytest.raises(RewardError, match=r"domain 'x' .*2 consecutive steps.*RuntimeError: broken reward"):
        mgr.check_step(["x", "y", "x"], mgr.score(items).outcomes)


def test_a_single_bad_item_scores_zero_counts_and_does_not_stop():
    mgr = RewardManager(RewardConfig(max_failed_steps=1))
    ok, bad, slow = ScoreOutcome(1.0), ScoreOutcome(0.0, "failed", "E"), ScoreOutcome(0.0, "timeout", "T")
    for _ in range(5):
        assert _step(mgr, "d", [ok, bad, slow]) == {"reward/d/failed": 1.0, "reward/d/timeout": 1.0}
    with pytest.raises(RewardError, match="its error: T"):  # every item bad (timeouts count): stop
        _step(mgr, "d", [slow, slow])
    never = RewardManager(RewardConfig(max_failed_steps=0))
    for _ in range(5):
        _step(never, "d", [bad])


def test_run_with_a_raising_reward_reports_counts_and_stops_with_its_error(tmp_path, toy, user_rewards):
    """The issue's run: a user reward that raises on every call. The run must stop (exit 1) with the reward's own
    error in one line, after max_failed_steps steps whose metrics count the failures; the progress bar shows them.
    Prompts longer than max_prompt_len are counted too (item 7)."""
    out = tmp_path / "run"
    r = mgs_train(toy, out, f"rewards.domains.math.reward={user_rewards}:boom", "rewards.max_failed_steps=2",
                  "run.total_steps=6", "run.progress=true", "rollout.max_prompt_len=12", "strategy=mixed")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mgs-train:") and " error: " in ln]
    assert len(lines) == 1 and lines[0].startswith("mgs-train: reward error:"), r.stderr[-3000:]
    assert "'math'" in lines[0] and "RuntimeError: broken reward" in lines[0]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1]  # step 2 stopped the run before it trained on zeros again
    assert rows[0]["reward/math/failed"] > 0 and rows[0]["reward/math/timeout"] == 0
    assert rows[0]["reward/if/failed"] == 0 and rows[0]["reward/math"] == 0.0
    assert rows[0]["rollout/truncated_prompts"] > 0  # item 7: 12 tokens cut every toy prompt
    assert re.search(r"math=0\.00 \(\d+ failed\)", r.stderr), r.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ 3
def test_math_reward_from_a_script_without_main_guard(tmp_path):
    """Scoring through RewardManager from a script with no `if __name__ == "__main__":` guard: the math workers must
    not re-run the script (with multiprocessing's spawn every item scored 0 with an EOFError)."""
    script = tmp_path / "score_math.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from mgs_megatron.rewards import RewardInput, RewardManager
        mgr = RewardManager({{"math": {{"reward": "math_verify"}}}})
        res = mgr.score([RewardInput("q", "so \\\\boxed{{4}}", {{"answer": "4"}}, "math"),
                         RewardInput("q", "\\\\boxed{{5}}", {{"answer": "4"}}, "math")])
        print("SCORES", res.scores, [o.error for o in res.outcomes])
        mgr.close()
        sys.exit(0)  # under spawn, a worker re-running this script died here: EOFError for every item
    """))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert "SCORES [1.0, 0.0] [None, None]" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("SCORES") == 1  # no worker ran the script again


def test_worker_cannot_run_a_function_of_the_running_script():
    from mgs_megatron.rewards.worker import ProcessPoolRunner

    with pytest.raises(ValueError, match="__main__.*move it into a module"):
        ProcessPoolRunner("__main__:fn")


# ------------------------------------------------------------------------------------------------ 4
def test_user_function_gets_the_math_deadline_and_timeouts_are_counted(user_rewards):
    """A dotted-path user function that sleeps 30 s on one item: that item times out at the default per-item
    deadline (math_verify's), the others score, and the timeout is counted."""
    from mgs_megatron.rewards import DEFAULT_TIMEOUT_S

    mgr = RewardManager({"u": {"reward": f"{user_rewards}:sleepy"}})
    items = [RewardInput("p", r, {}, "u") for r in ("a", "hang", "b")]
    try:
        t0 = time.monotonic()
        res = mgr.score(items)
        elapsed = time.monotonic() - t0
    finally:
        mgr.close()
    assert [o.status for o in res.outcomes] == ["ok", "timeout", "ok"] and res.scores == [1.0, 0.0, 1.0]
    assert res.metrics["reward/u/timeout"] == 1
    assert mgr.check_step(["u"] * 3, res.outcomes)["reward/u/timeout"] == 1.0
    assert elapsed < DEFAULT_TIMEOUT_S + 20  # the deadline plus worker start-ups, not 30 s of sleep


def test_deadline_is_configurable(user_rewards):
    cfg = load_config(TINY, [f"rewards.domains.u.reward={user_rewards}:sleepy", "rewards.timeout_s=1.5"])
    assert cfg.rewards.timeout_s == 1.5
    mgr = RewardManager(cfg.rewards)
    try:
        mgr.score([RewardInput("p", "a", {}, "u")])  # worker start-up outside the timed part
        t0 = time.monotonic()
        res = mgr.score([RewardInput("p", "hang", {}, "u")])
        elapsed = time.monotonic() - t0
    finally:
        mgr.close()
    assert res.outcomes[0].status == "timeout" and "1.5s" in res.outcomes[0].error
    assert elapsed < 1.5 + 15
