"""`mgs-compare CONFIG --strategies mixed sequential global-pcgrad mgs --seeds 1 2 3 [overrides]`: the paper's
comparison of training strategies, from the same initial model and data.

    mixed          strategy=mixed (all domains in one gradient: Mixed RL)
    sequential     strategy=sequential, one domain after another (total_steps / K each, unless data.stages is set)
    global-pcgrad  strategy=mgs mgs.rule=pcgrad mgs.granularity=global (PCGrad on the whole model: the baseline)
    mgs            strategy=mgs mgs.rule=pcgrad mgs.granularity=parameter (the paper's Modular Gradient Surgery)

Every strategy x seed runs `mgs-train` in <out>/<strategy>-seed<seed>/ (one after another on this machine, or
`--print-sbatch` prints one sbatch line each). Every run starts from the same weights: the first run's supervised
warm-up (cached) is the others' `model.init_checkpoint` when the config has one, else model.path. A finished run
(its <run>/compare.json says ok with the same config hash) is reused; a failed one is reported and the others kept.
Then <out>/comparison.md (per-domain validation reward and accuracy at the end, mean +- std over seeds, the Total
the paper reports, step budget, config hash) and <out>/comparison.png (validation curves per domain).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STRATEGIES = {
    "mixed": ["strategy=mixed"],
    "sequential": ["strategy=sequential"],
    "global-pcgrad": ["strategy=mgs", "mgs.rule=pcgrad", "mgs.granularity=global"],
    "mgs": ["strategy=mgs", "mgs.rule=pcgrad", "mgs.granularity=parameter"],
}


@dataclass
class Run:
    strategy: str
    seed: int
    out: Path
    overrides: list = field(default_factory=list)
    status: str = "pending"
    detail: str = ""

    @property
    def name(self) -> str:
        return f"{self.strategy}-seed{self.seed}"


def config_hash(config: str, overrides) -> str:
    text = Path(config).read_text() + "\n" + "\n".join(overrides)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan(config: str, strategies, seeds, overrides, out: Path) -> list[Run]:
    """Every strategy x seed with its overrides (sequential stages sized to the step budget)."""
    from mgs_megatron.rl.config import load_config

    cfg = load_config(config, overrides)
    runs = []
    for s in strategies:
        if s not in STRATEGIES:
            raise SystemExit(f"mgs-compare: unknown strategy {s!r} (known: {sorted(STRATEGIES)})")
        extra = list(STRATEGIES[s])
        if s == "sequential" and not cfg.data.stages:
            n = len(cfg.data.proportions) or _count_domains(cfg)
            extra.append(f"data.steps_per_stage={max(1, cfg.run.total_steps // max(n, 1))}")
        for seed in seeds:
            runs.append(Run(s, seed, out / f"{s}-seed{seed}", [*overrides, *extra, f"run.seed={seed}",
                                                                f"run.output_dir={out / f'{s}-seed{seed}'}"]))
    return runs


def _count_domains(cfg) -> int:
    from mgs_megatron.data import load_sources

    return len(load_sources(list(cfg.data.sources)))


def _done(run: Run, digest: str) -> bool:
    f = run.out / "compare.json"
    if not f.is_file():
        return False
    state = json.loads(f.read_text())
    return state.get("status") == "ok" and state.get("hash") == digest


def _initial_weights(config: str, overrides) -> list[str]:
    """Overrides that start a run from the first run's cached warm-up (when the config has a warm-up)."""
    from mgs_megatron.convert import is_canonical
    from mgs_megatron.rl.config import load_config
    from mgs_megatron.rl.warmup import cache_dir

    cfg = load_config(config, overrides)
    if cfg.warmup.steps <= 0:
        return []
    path = cache_dir(cfg)
    return [f"model.init_checkpoint={path}", "warmup.steps=0"] if is_canonical(path) else []


def execute(run: Run, config: str, digest: str, timeout: float) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    log = run.out / "compare.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, "-m", "mgs_megatron.rl.cli", config, *run.overrides,
                                 "run.progress=false"], stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    seconds = time.perf_counter() - t0
    run.status = "ok" if rc == 0 else "failed"
    run.detail = f"{seconds:.0f} s" if rc == 0 else f"exit {rc} after {seconds:.0f} s (log: {log})"
    (run.out / "compare.json").write_text(json.dumps({"status": run.status, "hash": digest, "returncode": rc,
                                                      "seconds": seconds}))


# ------------------------------------------------------------------------------------------------ the report
def read_metrics(run: Run) -> list[dict]:
    """The run's metrics rows (rl/metrics.read_metrics: a torn last line is skipped)."""
    from mgs_megatron.rl.metrics import read_metrics as read_rows

    f = run.out / "metrics.jsonl"
    return read_rows(f)[0] if f.is_file() else []


def final_validation(rows: list[dict]) -> dict[str, float]:
    val = [r for r in rows if any(k.startswith("val/") for k in r)]
    return {k: v for k, v in val[-1].items() if k.startswith("val/")} if val else {}


def _score_key(keys, domain: str) -> str:
    """The paper's per-domain score: accuracy where full marks mean correct, else the reward."""
    return f"val/{domain}/acc" if f"val/{domain}/acc" in keys else f"val/{domain}/reward"


def _mean_std(xs) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def summarize(runs: list[Run], strategies, digest: str, total_steps: int) -> str:
    finals = {r.name: final_validation(read_metrics(r)) for r in runs if r.status == "ok"}
    domains = sorted({k.split("/")[1] for f in finals.values() for k in f})
    keys = {k for f in finals.values() for k in f}
    lines = [f"Step budget: {total_steps} steps per run; config hash {digest}; validation is greedy on held-out "
             f"prompts at the last step. Score = accuracy where full marks mean correct, else reward; Total = the sum "
             f"of the domains' scores (the paper sums its Math and Chat averages).", ""]
    head = "| strategy | seeds | " + " | ".join(f"{d} reward" for d in domains) + " | " + \
        " | ".join(f"{d} acc" for d in domains if f"val/{d}/acc" in keys) + " | Total |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for s in strategies:
        mine = [finals[r.name] for r in runs if r.strategy == s and r.name in finals]
        cells = [_mean_std([f[f"val/{d}/reward"] for f in mine if f"val/{d}/reward" in f]) for d in domains]
        cells += [_mean_std([f[f"val/{d}/acc"] for f in mine if f"val/{d}/acc" in f])
                  for d in domains if f"val/{d}/acc" in keys]
        totals = [sum(f.get(_score_key(keys, d), 0.0) for d in domains) for f in mine]
        lines.append(f"| {s} | {len(mine)} | " + " | ".join(cells) + f" | {_mean_std(totals)} |")
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        lines += ["", "Failed runs (left out of the table): " + "; ".join(f"{r.name}: {r.detail}" for r in failed)]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], strategies, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict = {}
    for r in runs:
        if r.status != "ok":
            continue
        for row in read_metrics(r):
            for k, v in row.items():
                if k.startswith("val/") and k.endswith("/reward"):
                    curves.setdefault(k.split("/")[1], {}).setdefault(r.strategy, {}).setdefault(
                        row["step"], []).append(v)
    domains = sorted(curves)
    if not domains:
        return
    fig, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for s in strategies:
            pts = sorted(curves[d].get(s, {}).items())
            if not pts:
                continue
            steps = [p[0] for p in pts]
            mean = [sum(v) / len(v) for _, v in pts]
            sd = [math.sqrt(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)) for (_, v), m in zip(pts, mean)]
            ax.plot(steps, mean, marker="o", label=s)
            ax.fill_between(steps, [m - e for m, e in zip(mean, sd)], [m + e for m, e in zip(mean, sd)], alpha=0.15)
        ax.set_title(f"val/{d}/reward")
        ax.set_xlabel("step")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mgs-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. run.total_steps=80)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", default="runs/compare", help="output directory")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run")
    ap.add_argument("--print-sbatch", metavar="SBATCH", nargs="?", const="examples/slurm/train_multi_node.sbatch",
                    help="print one sbatch line per run instead of running them here")
    a = ap.parse_intermixed_args(argv)
    from mgs_megatron.errors import ConfigError
    from mgs_megatron.rl.config import load_config

    out = Path(a.out)
    try:
        runs = plan(a.config, a.strategies, a.seeds, a.overrides, out)
        total_steps = load_config(a.config, a.overrides).run.total_steps
    except ConfigError as e:
        print(f"mgs-compare: config error: {e}", file=sys.stderr)
        return 2
    digest = config_hash(a.config, a.overrides)
    if a.print_sbatch:
        for r in runs:
            print("sbatch " + a.print_sbatch + " " + a.config + " " + " ".join(r.overrides))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(runs):
        if _done(r, digest):
            r.status, r.detail = "ok", "reused"
            print(f"[mgs-compare] {i + 1}/{len(runs)} {r.name}: finished earlier, reused", flush=True)
            continue
        r.overrides += _initial_weights(a.config, runs[0].overrides)  # the first run's warm-up
        print(f"[mgs-compare] {i + 1}/{len(runs)} {r.name} ...", flush=True)
        execute(r, a.config, digest, a.timeout)
        print(f"[mgs-compare] {i + 1}/{len(runs)} {r.name}: {r.status} ({r.detail})", flush=True)
    report = summarize(runs, a.strategies, digest, total_steps)
    (out / "comparison.md").write_text(report)
    plot(runs, a.strategies, out / "comparison.png")
    print(report)
    print(f"[mgs-compare] wrote {out / 'comparison.md'} and {out / 'comparison.png'}")
    return 0 if all(r.status == "ok" for r in runs) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
