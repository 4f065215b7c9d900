"""Issue 16, "Errors a person can read": user errors are one line before anything starts, the converter's too; a
preempted run exits with a documented code and one line, a resumed run says where it resumed; validation at the
start and the end with val_every 0; quiet by default."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mgs_megatron.rl.cli import EXIT_PREEMPTED, main
from tests.reliability.conftest import ROOT, base_overrides, mgs_train, train_args

TINY = ROOT / "examples" / "tiny_cpu.yaml"
QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 512, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
         "hidden_act": "silu"}
NOISE = ("Traceback", "FutureWarning", "UserWarning", "OMP_NUM_THREADS", "torch.distributed.elastic",
         "ChildFailedError", "Loading weights", "NUMA", "tcmalloc")


def _one_line(err: str, start: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(start), err[-3000:]
    return lines[0]


@pytest.mark.parametrize("extra, why", [
    (["parallel.tensor_model_parallel_size=2"],
     "num_key_value_heads=1 is not divisible by tensor_model_parallel_size=2"),
    (["parallel.pipeline_model_parallel_size=2", "launcher.nproc_per_node=3"],
     "world size 3 is not divisible by tensor_model_parallel_size=1 x pipeline_model_parallel_size=2"),
    (["data.sources=[{empty_dir}]"], "a folder with no .jsonl or .parquet files"),
    (["data.sources=[{txt}]"], "unsupported file type '.txt'"),
])
def test_user_errors_are_one_line_before_any_rank_starts(tmp_path, toy, capsys, extra, why):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "prompts.txt").write_text("What is 1+1?\n")
    extra = [e.format(empty_dir=tmp_path / "empty_dir", txt=tmp_path / "prompts.txt") for e in extra]
    assert main([str(TINY), *base_overrides(toy, tmp_path / "o"), *extra]) == 2
    line = _one_line(capsys.readouterr().err, "mgs-train: config error: config key '")
    assert why in line


def _convert(argv, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    code = convert_checkpoint.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("hf, extra, why", [
    (None, [], "config.json' not found"),
    (dict(QWEN2, model_type="mistral"), [], "model_type='mistral' is 'mistral' but architectures=['Qwen2ForCausalLM']"
                                            " is 'qwen2'"),
    (QWEN2, ["--check", "--tp", "3"], "num_attention_heads=2 is not divisible by tensor_model_parallel_size=3"),
    (dict(QWEN2, hidden_act="gelu"), [], "hidden_act='gelu' is not supported"),
])
def test_converter_errors_are_one_line(tmp_path, capsys, hf, extra, why):
    src = tmp_path / "hf"
    src.mkdir()
    if hf is not None:
        (src / "config.json").write_text(json.dumps(hf))
    code, err = _convert(["hf-to-mcore", str(src), str(tmp_path / "out"), "--quiet", *extra], capsys)
    assert code == 2 and why in _one_line(err, "convert_checkpoint: error: ")
    assert not (tmp_path / "out").exists()


def test_model_type_and_architectures_must_agree():
    from mgs_megatron.errors import ConfigError
    from mgs_megatron.models import model_config_from_hf

    assert model_config_from_hf(QWEN2).architecture == "qwen2"
    with pytest.raises(ConfigError, match="model_type='mistral' is 'mistral' but architectures="):
        model_config_from_hf(dict(QWEN2, model_type="mistral"))


def test_val_every_zero_validates_at_the_start_and_the_end():
    from mgs_megatron.rl.validation import Validator

    v = Validator({"math": [object()]}, ["math"], val_every=0, total_steps=5)
    assert [v.due(s) for s in range(6)] == [True, False, False, False, False, True]
    v = Validator({"math": [object()]}, ["math"], val_every=2, total_steps=5)
    assert [v.due(s) for s in range(6)] == [True, False, True, False, True, True]


def test_weights_version_continues_after_resume(monkeypatch):
    """The vLLM engine of a run resumed at step 7 is synced as weights version 7 (the optimizer steps its weights
    hold), and the next optimizer step's sync is version 8, not 1 or 2."""
    from types import SimpleNamespace

    from mgs_megatron.rollout import backends, sync

    versions = []
    monkeypatch.setattr(sync, "sync_weights", lambda engine, chunks, model_cfg, version: versions.append(version)
                        or SimpleNamespace(as_metrics=lambda: {"rollout/weights_version": float(version)}))
    b = object.__new__(backends.VLLMBackend)  # the engine itself is not the point: its start is tested elsewhere
    b.engine, b.needs_sync = None, True
    b.memory = SimpleNamespace(wake=lambda tag: None)
    b.attach(chunks=[], model_cfg=None, weights_version=7)
    assert b._awake() == {"rollout/weights_version": 7.0}  # the first generation of the resumed run
    assert b._awake() == {}  # awake again without a step: no sync
    assert b.sync_weights() == {"rollout/weights_version": 8.0}
    assert versions == [7, 8]


def test_sigterm_is_one_line_and_a_documented_code_and_resume_says_where(tmp_path, toy):
    """SIGTERM to mgs-train (world 2): every rank finishes its step and checkpoints; the launcher exits 143 with one
    line, no torchrun traceback. Then `checkpoints/latest` is deleted (item 10): the rerun still finds the
    checkpoint by scanning, says "resumed from step N", and metrics.jsonl holds one history."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.Popen(train_args(toy, out, "run.total_steps=200", "run.save_every=0", "strategy=mgs"), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    line = _one_line(err, "mgs-train: preempted (SIGTERM) after step ")
    step = int(line.split("after step ")[1].split(":")[0])
    assert step >= 1 and (out / "checkpoints" / f"step_{step}" / "trainer.json").exists()
    assert "run the same command again to resume" in line

    (out / "checkpoints" / "latest").unlink()
    r = mgs_train(toy, out, f"run.total_steps={step + 1}", "run.save_every=0", "strategy=mgs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"mgs-train: resumed from step {step} ({out / 'checkpoints' / f'step_{step}'})" in r.stdout
    assert not any(n in r.stderr + err for n in NOISE), (r.stderr + err)[-3000:]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 2))
    assert max(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*")) == step + 1
