import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    from mgs_megatron.data.toy import ensure_toy_assets

    return ensure_toy_assets(tmp_path_factory.getbasetemp() / "toy")  # one copy per session, shared by packages


def base_overrides(toy, out) -> list[str]:
    return [f"run.output_dir={out}", "run.progress=false", "run.val_every=0", "run.val_prompts_per_domain=0",
            "run.export_hf=false", "run.tensorboard=false", f"model.tokenizer={toy['tokenizer']}",
            f"data.sources=[{toy['math']},{toy['if']},{toy['chat']}]",
            f"rewards.domains.chat.kwargs.model_path={toy['reward_model']}", "rollout.max_response_len=8",
            "data.prompts_per_step=3", "rollout.n=2", "warmup.steps=0",
            "rollout.backend=megatron"]


def mgs_train(args, timeout=240, **popen):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "mgs_megatron.rl.cli", str(ROOT / "examples" / "tiny_cpu.yaml"),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)
