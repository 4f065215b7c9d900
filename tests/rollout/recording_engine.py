"""A recording stand-in for RolloutEngine (tests/rollout/test_memory.py): the calls the trainer and the vLLM backend
make on the engine and on its `llm` (sleep / wake_up), in order, with `device` chosen by the test ("cuda" exercises
the GPU branch of rollout/gpu.py on this CPU machine: nothing reaches a real vLLM).

    python -m tests.rollout.recording_engine OUT.json CONFIG [overrides]   runs the trainer (world 1) with it, once
                                                                          with device "cuda", once with "cpu"
"""

from __future__ import annotations

import json
import os
import sys

from mgs_megatron.rollout.config import EngineInvalidError, Rollout


class FakeLLM:
    def __init__(self, calls: list, fail_wake: tuple = ()):
        self.calls, self.fail_wake = calls, fail_wake

    def sleep(self, level=1, mode="abort"):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({','.join(tags)})")
        if set(tags) & set(self.fail_wake):
            raise RuntimeError("CUDA out of memory (simulated)")
        return "kv_cache" in tags


class RecordingEngine:
    """The RolloutEngine surface the backend and rollout/sync.py use. Generation returns `n` fixed-length samples of
    small token ids per prompt (logprobs 0)."""

    device = "cuda"
    calls: list = []
    fail_wake: tuple = ()

    def __init__(self, model_path, cfg, *, seed=0, device="cpu", tokenizer=None, **engine_options):
        self.cfg, self.seed, self.version, self.invalid_reason = cfg, seed, 0, None
        self.kwargs = {"model": model_path, "load_format": cfg.extra_engine_kwargs.get("load_format")}
        self.calls.append(f"start(load_format={self.kwargs['load_format']})")
        self.llm = FakeLLM(self.calls, self.fail_wake)

    def generate(self, prompts, *, step=0, prompt_offset=0, n=None, temperature=None):
        self.check_valid()
        self.calls.append("generate")
        n = n or self.cfg.n
        resp = [4 + (step + k) % 7 for k in range(self.cfg.max_response_len)]
        return [Rollout([5, 6, 7], list(resp), [0.0] * len(resp), "the answer is 7", "length", prompt_offset + i, k)
                for i in range(len(prompts)) for k in range(n)]

    def check_valid(self):
        if self.invalid_reason is not None:
            raise EngineInvalidError(self.invalid_reason)

    def load_weights(self, weights):
        if not self.calls or self.calls[-1] != "sync":  # one entry per sync, however many buckets
            self.calls.append("sync")

    def refresh_tied_lm_head(self):
        return False

    def reset_prefix_cache(self):
        pass

    def mark_invalid(self, reason):
        self.invalid_reason = reason

    def mark_synced(self, version):
        self.version, self.invalid_reason = version, None

    def close(self):
        self.calls.append("close")


def _run_trainer(out: str, argv: list[str]) -> None:
    from mgs_megatron.rl import policy
    from mgs_megatron.rl.cli import main
    from mgs_megatron.rollout import engine

    engine.RolloutEngine = RecordingEngine
    update = policy.Policy.update

    def recorded_update(self, *a, **k):
        RecordingEngine.calls.append("train")
        return update(self, *a, **k)

    policy.Policy.update = recorded_update
    build = policy.Policy.__init__

    def recorded_build(self, *a, **k):
        RecordingEngine.calls.append("policy")
        build(self, *a, **k)

    policy.Policy.__init__ = recorded_build
    result = {}
    for device in ("cuda", "cpu"):
        RecordingEngine.device, RecordingEngine.calls = device, []
        rc = main([*argv[:1], *(a.replace("{device}", device) for a in argv[1:])])
        result[device] = {"rc": rc, "calls": RecordingEngine.calls}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    _run_trainer(sys.argv[1], sys.argv[2:])
