"""tools/install.sh --gpu --dry-run: the GPU requirement set (setup.py's `gpu` extra and everything it pulls: vLLM's
own pins of torch, transformers, ...) resolves, with the exact versions the code is written against, on this CPU
machine and without downloading the GPU wheels (pip --dry-run --report with fast-deps reads only their metadata).
Needs the package index (as CI has); an impossible pin fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(env=None):
    return subprocess.run(["bash", "tools/install.sh", "--gpu", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=400, env={**os.environ, **(env or {})})


def test_gpu_set_resolves():
    r = _dry_run()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("[install] GPU set resolves"))
    mcore = "0.16.1" if sys.version_info < (3, 12) else "0.19.2"
    for pin in ("torch 2.13.0,", "vllm 0.32.0,", f"megatron-core {mcore}"):
        assert pin in line, line


def test_an_impossible_pin_fails(tmp_path):
    # vllm 0.32.0 requires transformers >= 5.16.1: a constraint against it must make the resolution fail
    (tmp_path / "c.txt").write_text("transformers<5\n")
    r = _dry_run({"PIP_CONSTRAINT": str(tmp_path / "c.txt")})
    assert r.returncode != 0 and "ResolutionImpossible" in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
