"""Shared pieces of the reliability tests: the toy assets, a user reward module with broken rewards, and a short
`mgs-train` run (tiny config, megatron backend, world 2) with extra environment."""
import os
import subprocess
import sys
import textwrap

import pytest

from tests.rl.conftest import ROOT, base_overrides, toy  # noqa: F401 - `toy` is a fixture

USER_REWARDS = textwrap.dedent("""
    import time

    def boom(prompt, response, sample):
        raise RuntimeError("broken reward")

    def nan(prompt, response, sample):
        return float("nan")

    def one(prompt, response, sample):
        return 1.0

    def sleepy(prompt, response, sample):
        if response == "hang":
            time.sleep(30)
        return 1.0
""")


@pytest.fixture()
def user_rewards(tmp_path, monkeypatch):
    """The module name of USER_REWARDS, importable here and (through PYTHONPATH) in subprocesses."""
    (tmp_path / "mgs_rel_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    yield "mgs_rel_rewards"
    sys.modules.pop("mgs_rel_rewards", None)


def train_args(assets, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mgs_megatron.rl.cli", str(ROOT / "examples" / "tiny_cpu.yaml"),
            *base_overrides(assets, out), *extra]


def mgs_train(assets, out, *extra, timeout=300) -> subprocess.CompletedProcess:
    """A short run as a person starts it (no PYTHONWARNINGS of ours: the quiet output is the launcher's)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(train_args(assets, out, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
