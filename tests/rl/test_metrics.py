"""Metric sinks and helpers (rank-0 side, no process group): JSONL, truncation on resume, W&B glue, accuracy."""
import json
import sys
import types

import pytest

from mgs_megatron.rl.metrics import MetricsWriter, accuracy, system_stats


def test_accuracy():
    assert accuracy([1.0, 0.0, 1.0, 0.5]) == 0.5
    assert accuracy([2.0, 1.0], threshold=2.0) == 0.5  # a reward weighted by 2: full marks are 2
    assert accuracy([]) == 0.0


def test_jsonl_and_truncate_after_resume(tmp_path):
    w = MetricsWriter(tmp_path, config={}, run_name="t", tensorboard=False, wandb=False)
    for step in (1, 2, 3):
        w.log({"step": step, "reward/all": step / 10, "module_cos": {"a-b": {"x": 0.5}}})
    w.truncate_after(2)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["module_cos"] == {"a-b": {"x": 0.5}}
    w.close()


def test_wandb_gets_scalars_and_keeps_one_run_per_output_dir(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    w = MetricsWriter(tmp_path, config={"lr": 1e-6}, run_name="r", tensorboard=False, wandb=True)
    w.log({"step": 4, "reward/math": 0.5, "module_cos": {"a-b": {}}, "actor/update_ok": True})
    w.close()
    MetricsWriter(tmp_path, config={}, run_name="r", tensorboard=False, wandb=True).close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["project"] == "r" and inits[0]["config"] == {"lr": 1e-6} and inits[0]["resume"] == "allow"
    assert inits[0]["id"] == inits[1]["id"]  # a resumed run continues the same W&B run
    assert ("log", {"reward/math": 0.5, "actor/update_ok": True}, 4) in calls and ("finish",) in calls


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match="run.wandb"):
        MetricsWriter(tmp_path, config={}, run_name="r", tensorboard=False, wandb=True)


def test_system_stats_cpu():
    s = system_stats("cpu")
    assert set(s) == {"mem/peak_rss_gib"} and 0.01 < s["mem/peak_rss_gib"] < 1024


def test_accuracy_threshold_without_building_rewards():
    from mgs_megatron.rewards import RewardManager

    rm = RewardManager({"math": {"reward": "math_verify", "weight": 2.0}, "if": {"reward": "if"},
                        "chat": {"reward": "reward_model", "kwargs": {"model_path": "/nonexistent"}},
                        "mine": {"reward": "tests.rl.test_metrics:accuracy"}})
    assert [rm.accuracy_threshold(d) for d in ("math", "if", "chat", "mine")] == [2.0, 1.0, None, None]
    assert not rm._rewards  # nothing was built (the chat model path does not exist)
