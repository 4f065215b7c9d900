"""A wheel built from the repository, installed (not editable) into a throwaway environment, ships every package:
`mgs-train --help` runs and the trainer imports, from a directory where the checkout is not on the path."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_ships_every_package_and_the_cli_runs(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(ROOT)], cwd=tmp_path)
    (wheel,) = wheels.glob("mgs_megatron-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "mgs_megatron").rglob("__init__.py")}
    shipped = {str(Path(n).parent) for n in names if n.endswith("__init__.py")}
    assert packages <= shipped, f"missing from the wheel: {sorted(packages - shipped)}"
    missing_init = [str(d.relative_to(ROOT)) for d in (ROOT / "mgs_megatron").iterdir()
                    if d.is_dir() and d.name != "__pycache__" and not (d / "__init__.py").exists()]
    assert not missing_init, f"package directories without __init__.py (left out of wheels): {missing_init}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    # the dependencies come from this environment (a path entry, after the venv's own site-packages); the package
    # itself only from the wheel, installed non-editable
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _run([str(venv / "bin" / "python"), "-c",
              "import mgs_megatron, mgs_megatron.rl.trainer, mgs_megatron.rl.cli; print(mgs_megatron.__file__)"],
             cwd=elsewhere, env=env)
    assert str(site) in r.stdout, r.stdout  # the wheel's copy, not the checkout's
    r = _run([str(venv / "bin" / "mgs-train"), "--help"], cwd=elsewhere, env=env)
    assert "usage: mgs-train" in r.stdout
