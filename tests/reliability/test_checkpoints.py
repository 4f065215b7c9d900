"""Issue 16, items 9-12: checkpoints and logs that lost work (damaged, missing `latest`, torn metrics, read-only
output), in process: a plain torch module and Adam stand in for the Megatron chunks and optimizer (resume.py only
needs state dicts)."""
import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mgs_megatron.errors import CheckpointError
from mgs_megatron.rl import resume
from mgs_megatron.rl.config import ConfigError, check_paths, load_config
from mgs_megatron.rl.metrics import MetricsWriter
from tests.reliability.conftest import ROOT, base_overrides

TINY = ROOT / "examples" / "tiny_cpu.yaml"


def _policy(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return [model], SimpleNamespace(optimizer=torch.optim.Adam(model.parameters()))


def _save(root, step, keep=5):
    chunks, opt = _policy(step)
    resume.save(root, step, chunks, opt, {"step": step, "world_size": 1}, {"extra": step}, keep=keep)
    return {k: v.clone() for k, v in chunks[0].state_dict().items()}


# ------------------------------------------------------------------------------------------------ 9
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    weights = {s: _save(root, s) for s in (2, 4)}
    f = root / "step_4" / "rank_0.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # the issue's cut-in-half rank file
    chunks, opt = _policy(99)
    with caplog.at_level(logging.WARNING, logger="mgs_megatron.rl.resume"):
        path, state, extra = resume.Checkpointer(root, every=0, keep=2).load_newest(chunks, opt)
    assert path == root / "step_2" and state["step"] == 2 and extra["extra"] == 2
    for k, v in chunks[0].state_dict().items():
        assert torch.equal(v, weights[2][k]), k
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"{f} is damaged" in msg and "resuming from the newest complete checkpoint" in msg and "step_2" in msg


def test_no_loadable_checkpoint_is_an_error_naming_the_files(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    (root / "step_2" / "rank_0.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be loaded: .*step_2/rank_0.pt is damaged"):
        resume.load_newest(root, *_policy(0))


# ------------------------------------------------------------------------------------------------ 10
def test_checkpoints_are_found_by_scanning(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4):
        _save(root, s)
    (root / "latest").unlink()
    assert resume.latest(root) == root / "step_4"
    (root / "step_4" / "trainer.json").unlink()  # the newest without trainer.json: incomplete
    assert resume.latest(root) == root / "step_2"
    path, state, _ = resume.load_newest(root, *_policy(0))
    assert path == root / "step_2"


def test_rotation_deletes_only_older_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4):
        _save(root, s)
    (root / "step_4" / "trainer.json").unlink()
    _save(root, 3, keep=2)  # resumed from step 2 (4 is incomplete), then saved step 3
    assert sorted(p.name for p in root.glob("step_*")) == ["step_2", "step_3", "step_4"]
    _save(root, 5, keep=2)  # keeps step 3 (keep - 1 complete older ones); the incomplete step 4 is left alone
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3", "step_4", "step_5"]


def test_starting_over_in_a_directory_with_checkpoints_is_refused(tmp_path, toy):
    out = tmp_path / "run"
    _save(out / "checkpoints", 3)
    ov = base_overrides(toy, out)
    with pytest.raises(ConfigError, match=r"'run.resume': 'never' starts over, but .* holds checkpoints \(step_3\)"):
        check_paths(load_config(TINY, ov + ["run.resume=never"]))
    check_paths(load_config(TINY, ov + ["run.resume=auto"]))
    check_paths(load_config(TINY, ov + ["run.resume=overwrite"]))
    resume.Checkpointer(out / "checkpoints", every=0, keep=2).clear()  # what 'overwrite' does at the start
    assert not list((out / "checkpoints").glob("step_*"))


def _rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_metrics_never_get_a_second_history(tmp_path):
    w = MetricsWriter(tmp_path, config={}, run_name="t", tensorboard=False, wandb=False)
    for s in (0, 1, 2, 3):
        w.log({"step": s, "reward/math": 0.5})
    w.truncate_after(2)  # resumed from the step-2 checkpoint: step 3 is redone
    assert [r["step"] for r in _rows(w.file)] == [0, 1, 2]
    w.truncate_after(0)  # no checkpoint: everything is redone, from step 0
    w.log({"step": 0, "val/math/reward": 0.1})
    assert [r["step"] for r in _rows(w.file)] == [0]


# ------------------------------------------------------------------------------------------------ 11
def _torn(tmp_path):
    f = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward/math": s / 10, "module_cos": {"math-if": {"q": 0.5, "k": -0.2}}} for s in (1, 2)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "reward/ma')
    return f


def test_resume_drops_a_torn_last_metrics_line_and_says_so(tmp_path, caplog):
    f = _torn(tmp_path)
    w = MetricsWriter(tmp_path, config={}, run_name="t", tensorboard=False, wandb=False)
    with caplog.at_level(logging.WARNING, logger="mgs_megatron.rl"):
        w.truncate_after(2)
    assert [r["step"] for r in _rows(f)] == [1, 2]
    assert any(f"{f}: line 3 is not a complete JSON object" in r.getMessage() for r in caplog.records)


def test_plot_tool_skips_a_torn_line_and_says_no_data_for_an_empty_file(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "plot_conflicts.py")]
    f = _torn(tmp_path)
    r = subprocess.run(tool + [str(f), "--out", str(tmp_path / "plots")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{f}: line 3 is not a complete JSON object" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "plots" / "rewards.png").exists() and (tmp_path / "plots" / "conflicts_math-if.png").exists()
    empty = tmp_path / "empty" / "metrics.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    r = subprocess.run(tool + [str(empty)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"no data in {empty}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "empty" / "plots").exists()


# ------------------------------------------------------------------------------------------------ 12
def test_unwritable_output_directory_fails_before_any_work(tmp_path, toy):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("")  # checkpoints/ cannot be created (root can write into a chmod-ed dir)
    with pytest.raises(ConfigError, match=r"'run.output_dir': .*checkpoints' is not writable"):
        check_paths(load_config(TINY, base_overrides(toy, out)))
