"""vLLM and Megatron on the same GPUs (rollout/gpu.py, rollout/backends.py VLLMBackend): the config keys, the engine's
start-up arguments, and the order of sleep / wake / sync / generate calls, asserted with a recording engine whose
`device` says "cuda" (the GPU branch; nothing reaches a real vLLM here) or "cpu" (no sleep mode: no sleep / wake)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mgs_megatron.errors import ConfigError
from mgs_megatron.rl.config import load_config
from mgs_megatron.rollout import RolloutConfig, RolloutError, engine_kwargs
from mgs_megatron.rollout.config import EngineInvalidError, SyncStats
from tests.rl.conftest import ROOT, base_overrides
from tests.rollout.recording_engine import RecordingEngine

TINY = ROOT / "examples" / "tiny_cpu.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["rollout.gpu_memory_utilization=0"], "gpu_memory_utilization=0.0 must be in (0, 1]"),
    (["rollout.gpu_memory_utilization=1.2"], "gpu_memory_utilization=1.2 must be in (0, 1]"),
    (["rollout.sleep_level=3"], "'rollout.sleep_level': 3 is not one of [0, 1, 2]"),
    (["rollout.cudagraph_capture_sizes=[0,8]"], "must be batch sizes >= 1"),
    (["rollout.cudagraph_capture_sizes=[8]", "rollout.enforce_eager=true"], "enforce_eager=true disables CUDA graphs"),
])
def test_config_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match="rollout") as e:
        load_config(TINY, overrides)
    assert message in str(e.value)


def test_engine_arguments_per_device():
    cfg = RolloutConfig(gpu_memory_utilization=0.4, sleep_level=2, cudagraph_capture_sizes=(16, 1, 8))
    cpu = engine_kwargs("m", cfg, device="cpu")
    assert cpu["enforce_eager"] is True and "enable_sleep_mode" not in cpu and "gpu_memory_utilization" not in cpu
    gpu = engine_kwargs("m", cfg, device="cuda")
    assert gpu["enforce_eager"] is False and gpu["enable_sleep_mode"] is True
    assert gpu["gpu_memory_utilization"] == 0.4 and gpu["cudagraph_capture_sizes"] == [1, 8, 16]
    assert engine_kwargs("m", RolloutConfig(sleep_level=0), device="cuda")["enable_sleep_mode"] is False
    assert "cudagraph_capture_sizes" not in engine_kwargs("m", RolloutConfig(enforce_eager=True), device="cuda")
    assert cfg.eager("cpu") and not cfg.eager("cuda") and RolloutConfig(enforce_eager=False).eager("cpu") is False


@pytest.fixture
def recording(monkeypatch, tmp_path):
    """VLLMBackend over a RecordingEngine; weight syncs are recorded instead of streaming a Megatron model."""
    from mgs_megatron.rollout import engine, sync
    from mgs_megatron.rollout.backends import VLLMBackend

    calls: list = []
    monkeypatch.setattr(RecordingEngine, "calls", calls)
    monkeypatch.setattr(engine, "RolloutEngine", RecordingEngine)

    def fake_sync(eng, chunks, model_cfg, version):
        eng.mark_invalid("sync in progress")
        eng.load_weights([])
        eng.mark_synced(version)
        return SyncStats(eng.version, 1, 0.0, 1, 1)

    monkeypatch.setattr(sync, "sync_weights", fake_sync)

    def make(device="cuda", fail_wake=(), **cfg):
        monkeypatch.setattr(RecordingEngine, "device", device)
        monkeypatch.setattr(RecordingEngine, "fail_wake", fail_wake)
        backend = VLLMBackend(RolloutConfig(backend="vllm", n=1, max_response_len=3, **cfg), str(tmp_path), seed=0,
                              device=device)
        return backend.attach(chunks=None, model_cfg=None), calls

    return make


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_levels(recording, level):
    backend, calls = recording(sleep_level=level)
    backend.generate(["hi"], 1, step=0)
    backend.generate(["hi"], 1, step=0)  # e.g. validation after training: asleep again
    again = ["wake_up(weights)", "sync", "wake_up(kv_cache)"] if level == 2 else ["wake_up(weights)",
                                                                                  "wake_up(kv_cache)"]
    assert calls == ["start(load_format=dummy)", "sleep(2)",  # the dummy weights: nothing worth a host copy
                     "wake_up(weights)", "sync", "wake_up(kv_cache)", "generate", f"sleep({level})",
                     *again, "generate", f"sleep({level})"]


def test_no_sleep_on_cpu_or_at_level_0(recording):
    for device, level in (("cpu", 1), ("cuda", 0)):
        backend, calls = recording(device=device, sleep_level=level)
        backend.generate(["hi"], 1, step=0)
        backend.sync_weights()
        backend.generate(["hi"], 1, step=1)
        assert calls == ["start(load_format=dummy)", "sync", "generate", "sync", "generate"]
        calls.clear()


@pytest.mark.parametrize("tag", ["weights", "kv_cache"])
def test_failed_wake_leaves_the_engine_invalid(recording, tag):
    backend, calls = recording(fail_wake=(tag,))
    with pytest.raises(RolloutError, match=f"wake_up.*{tag}.*out of memory.*gpu_memory_utilization"):
        backend.generate(["hi"], 1, step=0)
    assert "wake_up" in backend.engine.invalid_reason
    with pytest.raises(EngineInvalidError):
        backend.engine.generate(["hi"], step=0)
    n = len(calls)
    with pytest.raises(EngineInvalidError):  # and the backend does not touch the engine's memory again
        backend.generate(["hi"], 1, step=0)
    with pytest.raises(EngineInvalidError):
        backend.sync_weights()
    assert len(calls) == n and "generate" not in calls


def test_trainer_call_order_over_two_steps(tmp_path, toy):
    """The trainer's calls on the engine: created before the policy (model, reference, optimizer) and put to sleep;
    then per step wake (weights) -> weight sync -> wake (KV cache) -> generate -> sleep -> train (step 1 wakes and
    syncs inside its generate phase, from the dummy start; step 2 in step 1's sync phase, after the update). On CPU
    the same order without sleep / wake. Both runs (world 1) in one process."""
    out = tmp_path / "calls.json"
    args = base_overrides(toy, tmp_path / "{device}") + ["rollout.backend=vllm", "run.total_steps=2",
                                                         "launcher.nproc_per_node=1", "strategy=mixed"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "tests.rollout.recording_engine", str(out), str(TINY), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["cuda"]["rc"] == rec["cpu"]["rc"] == 0, r.stderr[-3000:]
    cycle = ["wake_up(weights)", "sync", "wake_up(kv_cache)", "generate", "sleep(1)", "train"]
    assert rec["cuda"]["calls"] == ["start(load_format=dummy)", "sleep(2)", "policy", *cycle, *cycle,
                                    "wake_up(weights)", "sync", "wake_up(kv_cache)", "close"]
    assert rec["cpu"]["calls"] == ["start(load_format=dummy)", "policy", "sync", "generate", "train", "sync",
                                   "generate", "train", "sync", "close"]
