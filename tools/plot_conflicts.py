#!/usr/bin/env python
"""Plots from a run's metrics.jsonl (mgs_megatron.rl trainer):

  conflicts_<a>-<b>.png  heatmap of the per-module gradient cosine between domains a and b (module x step),
                         from the MGS per-module Gram (strategy: mgs); red = conflict (cos < 0)
  rewards.png            per-domain training reward per step (and validation reward where logged)

    python tools/plot_conflicts.py runs/tiny_cpu/metrics.jsonl --out runs/tiny_cpu/plots

A line that is not complete JSON (a crash mid-write, or a run still writing) is skipped and named on stderr; a file
without rows says "no data" and exits 1 without writing plots.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path) -> list[dict]:
    """The rows of a metrics.jsonl; unreadable lines are named on stderr and skipped."""
    from mgs_megatron.rl.metrics import read_metrics

    rows, problems = read_metrics(path)
    for p in problems:
        print(f"plot_conflicts: skipping {p}", file=sys.stderr)
    return rows


def plot(metrics_file, out_dir, rows=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = load(metrics_file) if rows is None else rows
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    cos_rows = [r for r in rows if "module_cos" in r]
    pairs = sorted({p for r in cos_rows for p in r["module_cos"]})
    for pair in pairs:
        modules = sorted({m for r in cos_rows for m in r["module_cos"].get(pair, {})})
        steps = [r["step"] for r in cos_rows]
        grid = np.full((len(modules), len(steps)), np.nan)
        for j, r in enumerate(cos_rows):
            for i, m in enumerate(modules):
                v = r["module_cos"].get(pair, {}).get(m)
                if v is not None:
                    grid[i, j] = v
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(steps) + 3), max(4, 0.18 * len(modules) + 1)))
        im = ax.imshow(grid, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(modules)), modules, fontsize=6)
        ax.set_xticks(range(len(steps)), steps, fontsize=6)
        ax.set_xlabel("step")
        ax.set_title(f"per-module gradient cosine {pair}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out / f"conflicts_{pair}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    domains = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("reward/")} - {"all"})
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in domains:
        pts = [(r["step"], r[f"reward/{d}"]) for r in rows if f"reward/{d}" in r]
        if pts:
            ax.plot(*zip(*pts), label=f"train {d}")
        vpts = [(r["step"], r[f"val/{d}/reward"]) for r in rows if f"val/{d}/reward" in r]
        if vpts:
            ax.plot(*zip(*vpts), "o--", label=f"val {d}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "rewards.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(p)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics")
    ap.add_argument("--out", default=None, help="output folder (default: <metrics dir>/plots)")
    a = ap.parse_args(argv)
    if not Path(a.metrics).is_file():
        print(f"plot_conflicts: {a.metrics} does not exist", file=sys.stderr)
        return 1
    rows = [r for r in load(a.metrics) if "step" in r]
    if not rows:
        print(f"plot_conflicts: no data in {a.metrics}", file=sys.stderr)
        return 1
    for p in plot(a.metrics, a.out or Path(a.metrics).parent / "plots", rows=rows):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
