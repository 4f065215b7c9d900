"""examples/mgs_in_your_loop.py runs as documented (torchrun, two CPU ranks) and trains."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "mgs_in_your_loop.py"), "--steps", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = re.findall(r"step (\d): loss ([\d.]+)\s+grad_norm ([\d.]+)\s+domains (\d)", proc.stdout)
    assert [s[0] for s in steps] == ["0", "1"] and all(s[3] == "3" for s in steps), proc.stdout
