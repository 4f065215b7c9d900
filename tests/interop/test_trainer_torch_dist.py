"""The trainer with run.checkpoint_format=torch_dist (world 2, tiny model, rollout.backend=megatron): a resume at
the same layout is bit-exact (model from torch_dist, optimizer from the per-rank files), and a run saved at DP2
resumes at PP2 with the saved model."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from tests.rl.conftest import base_overrides, mgs_train

pytestmark = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason=(
    "the trainer's reward stack (math-verify, IFEval checkers) is installed in .venv only; this runs there"))


def _metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _comparable(m):
    return {k: v for k, v in m.items() if not k.startswith(("time/", "surgery/seconds", "mem/", "gpu/"))}


def _rewind(ckpts, step: int) -> None:
    for p in ckpts.glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step_{step}")


def test_torch_dist_checkpoints_resume_here_and_at_another_layout(tmp_path, toy):
    from mgs_megatron.convert import SafetensorsDir
    from mgs_megatron.convert.torch_dist_convert import torch_dist_to_hf
    from mgs_megatron.convert.torch_dist_io import TorchDistReader

    common = base_overrides(toy, None)[1:] + ["strategy=mgs", "run.save_every=1", "run.keep_checkpoints=3",
                                              "run.checkpoint_format=torch_dist"]
    a = tmp_path / "a"
    r = mgs_train([f"run.output_dir={a}", "run.total_steps=2"] + common)
    assert r.returncode == 0, r.stderr[-3000:]
    step2 = _metrics(a)[1]
    model_dir = a / "checkpoints" / "step_1" / "model"
    assert TorchDistReader(model_dir).path.name == "iter_0000001"  # Megatron-LM's layout, tracker included
    assert "model" not in torch.load(a / "checkpoints" / "step_1" / "rank_0.pt", weights_only=False)
    shutil.copytree(a / "checkpoints", tmp_path / "saved")
    shutil.copy(a / "metrics.jsonl", tmp_path / "saved.jsonl")

    # the same layout, from step 1: step 2 again, bit for bit
    _rewind(a / "checkpoints", 1)
    r = mgs_train([f"run.output_dir={a}", "run.total_steps=2"] + common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in _metrics(a)] == [1, 2] and _comparable(_metrics(a)[1]) == _comparable(step2)

    # another layout (PP2): the step-1 model is loaded (no step runs; the final HF export is that model)
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "saved", b / "checkpoints")
    shutil.copy(tmp_path / "saved.jsonl", b / "metrics.jsonl")  # the run's directory moves to the new job
    _rewind(b / "checkpoints", 1)
    r = mgs_train([f"run.output_dir={b}", "run.total_steps=1"] + common + ["run.export_hf=true",
                                                                          "parallel.pipeline_model_parallel_size=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restart" in r.stderr  # the warning that the optimizer state did not move
    torch_dist_to_hf(model_dir, tmp_path / "step1_hf")
    got, want = SafetensorsDir(b / "hf"), SafetensorsDir(tmp_path / "step1_hf")
    assert sorted(got.keys()) == sorted(want.keys()) and all(torch.equal(got.get(k), want.get(k)) for k in want.keys())

    # a checkpoint whose model is in per-rank files cannot move: the error says which option makes one that can
    shutil.rmtree(b / "checkpoints" / "step_1" / "model")
    r = mgs_train([f"run.output_dir={b}", "run.total_steps=1"] + common + ["parallel.pipeline_model_parallel_size=2"])
    assert r.returncode != 0 and "run.checkpoint_format=torch_dist" in r.stderr, r.stderr[-2000:]
