"""A step's metrics: how they are computed (per domain, per phase, per module) and where they go.

`MetricsWriter` (rank 0 only) appends one JSON line per step to RUN/metrics.jsonl (always), and mirrors the
scalars to TensorBoard (`run.tensorboard`) and Weights & Biases (`run.wandb`; optional, `pip install wandb`).
metrics.jsonl holds one history: at a (re)start, lines of steps past the checkpoint (all of them when starting at
step 0) are dropped, and so is a torn line a crash left mid-write, with a warning; `read_metrics` is the one
tolerant reader (the summary table and tools/plot_conflicts.py use it).
`PhaseTimer` times the step's phases into time/<phase>; `domain_metrics` gives reward / accuracy / length per
domain; `rollout_metrics` the truncated prompts; `module_cosines` the per-module gradient cosines that
tools/plot_conflicts.py draws; `progress_postfix` the progress bar's text; `summary_table` the start / end table a
run prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mgs_megatron.devices import collective_device

log = logging.getLogger("mgs_megatron.rl")


class MetricsWriter:
    def __init__(self, out: Path, *, config: dict, run_name: str, tensorboard: bool, wandb: bool,
                 wandb_project: str = ""):
        self.file = Path(out) / "metrics.jsonl"
        self.tb = self.wb = None
        self._told_truncation = False
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - metrics still go to JSONL
                log.warning("TensorBoard disabled: %s", e)
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise RuntimeError("config key 'run.wandb' is true but wandb is not installed "
                                   "(pip install wandb, or set run.wandb=false)") from None
            self.wb = wb.init(project=wandb_project or run_name, name=run_name, config=config, dir=str(out),
                              resume="allow", id=_wandb_id(out))

    @classmethod
    def for_run(cls, cfg, out: Path) -> "MetricsWriter":
        """The run's writer (rank 0): creates the output directory and records the config beside the metrics."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        return cls(out, config=cfg.to_dict(), run_name=cfg.run.name, tensorboard=cfg.run.tensorboard,
                   wandb=cfg.run.wandb, wandb_project=cfg.run.wandb_project)

    def truncate_after(self, step: int) -> None:
        """At a (re)start from `step`, keep only the history up to it: lines of later steps (they will be redone;
        at step 0, every line: a second history is never appended) and torn lines (a crash mid-write) are dropped,
        with a warning. The file is replaced atomically."""
        if not self.file.exists():
            return
        rows, problems = read_metrics(self.file)
        keep = [r for r in rows if step > 0 and r.get("step", 0) <= step]
        for p in problems:
            log.warning("%s; dropped", p)
        if len(keep) < len(rows):
            log.warning("%s: dropped %d line(s) of steps after %d (they are redone)", self.file, len(rows) - len(keep),
                        step)
        tmp = self.file.with_name(self.file.name + ".part")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.file)

    def log(self, metrics: dict) -> None:
        with open(self.file, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()
        if self.wb is not None:
            self.wb.log(scalars, step=metrics["step"])
        cut, dropped = metrics.get("rollout/truncated_prompts"), metrics.get("rollout/dropped_prompts")
        if (cut or dropped) and not self._told_truncation:
            self._told_truncation = True
            log.warning("step %d: %d prompt(s) longer than rollout.max_prompt_len were truncated to their last tokens "
                        "and %d dropped (rollout.prompt_truncation; counted in rollout/truncated_prompts and "
                        "rollout/dropped_prompts; 'error' refuses them instead)", metrics["step"], cut or 0,
                        dropped or 0)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _wandb_id(out: Path) -> str:
    """One W&B run per output directory, so a resumed run continues the same W&B run."""
    f = Path(out) / "wandb_id"
    if not f.exists():
        import uuid

        f.write_text(uuid.uuid4().hex[:12])
    return f.read_text().strip()


def read_metrics(path) -> tuple[list[dict], list[str]]:
    """(rows, problems) of a metrics.jsonl: a line that is not a JSON object (a torn last line of a crash, or a file
    still being written) is skipped and named in `problems` with its file and line number."""
    rows, problems = [], []
    for i, ln in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            problems.append(f"{path}: line {i} is not a complete JSON object (a torn write?): {ln[:60]!r}")
    return rows, problems


# ================================================================================================ pure helpers
class PhaseTimer:
    """`with timer("generate"): ...` adds the phase's wall time to metrics["time/generate"]; time/step is the
    time since the timer was made."""

    def __init__(self, metrics: dict):
        self.metrics, self.start = metrics, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}"
            self.metrics[key] = self.metrics.get(key, 0.0) + time.perf_counter() - t0
            self.metrics["time/step"] = time.perf_counter() - self.start


def domain_metrics(samples, domains: Sequence[str], accuracy_threshold: Callable[[str], Optional[float]]) -> dict:
    """reward/<d>, reward_std/<d>, response_length/<d> and acc/<d> (where full marks mean correct) per domain of
    the step, reward/all and samples_kept."""
    r, out = samples.scores, {}
    for d in domains:
        idx = [i for i, x in enumerate(samples.domains) if x == d]
        if not idx:
            continue
        out[f"reward/{d}"] = float(r[idx].mean())
        out[f"response_length/{d}"] = sum(len(samples.rollouts[i].response_ids) for i in idx) / len(idx)
        out[f"reward_std/{d}"] = float(r[idx].std()) if len(idx) > 1 else 0.0
        threshold = accuracy_threshold(d)
        if threshold is not None:
            out[f"acc/{d}"] = accuracy(r[idx].tolist(), threshold)
    out["reward/all"] = float(r.mean())
    out["samples_kept"] = len(samples.keep)
    return out


def rollout_metrics(rollouts, num_prompts: int) -> dict:
    """rollout/truncated_prompts: prompts of the step cut to rollout.max_prompt_len (counted once per prompt);
    rollout/dropped_prompts: prompts that got no samples (rollout.prompt_truncation=drop)."""
    sampled = {ro.prompt_index for ro in rollouts}
    return {"rollout/truncated_prompts": float(sum(ro.prompt_truncated for ro in rollouts if ro.sample_index == 0)),
            "rollout/dropped_prompts": float(num_prompts - len(sampled))}


def progress_postfix(m: dict, domains: Sequence[str]) -> dict[str, str]:
    """The progress bar's text: each domain's reward, with its failed / timed-out reward calls when there were
    any, and the truncated prompts."""
    out = {}
    for d in domains:
        text = f"{m.get(f'reward/{d}', 0):.2f}"
        bad = [f"{int(m[k])} {w}" for w, k in (("failed", f"reward/{d}/failed"), ("timeout", f"reward/{d}/timeout"))
               if m.get(k)]
        out[d] = text + (f" ({', '.join(bad)})" if bad else "")
    for what in ("truncated", "dropped"):
        if m.get(f"rollout/{what}_prompts"):
            out[what] = str(int(m[f"rollout/{what}_prompts"]))
    return out


def module_cosines(gram: torch.Tensor, weights: torch.Tensor, module_names: Sequence[str],
                   domains: Sequence[str]) -> dict:
    """{"a-b": {module: cosine of domains a and b's gradients on the module}} from the surgery's last Gram."""
    from mgs_megatron.surgery import surgery_tensors

    cos = surgery_tensors(gram, weights)["cos"]
    return {f"{domains[a]}-{domains[b]}": dict(zip(module_names, cos[:, a, b].tolist()))
            for a in range(len(domains)) for b in range(a + 1, len(domains))}


def accuracy(scores: Sequence[float], threshold: float = 1.0) -> float:
    """Fraction of samples at full marks (math answer verified; every IFEval instruction followed)."""
    return sum(s >= threshold for s in scores) / len(scores) if scores else 0.0


def system_stats(device: str) -> dict[str, float]:
    """This process's memory (peak RSS) and, on CUDA, torch's allocator peaks and the GPU's own view (NVML)."""
    out = {"mem/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if device == "cuda" and torch.cuda.is_available():
        out["mem/gpu_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        out["mem/gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out.update(_nvml_stats(str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)))
    return out


def nvml_uuid(torch_uuid: str) -> str:
    """NVML's name of the GPU torch calls `torch_uuid` ("GPU-<uuid>"): a device is looked up by UUID because torch's
    index counts only CUDA_VISIBLE_DEVICES while NVML's counts every GPU of the node."""
    return torch_uuid if torch_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{torch_uuid}"


def _nvml_stats(uuid: str) -> dict[str, float]:
    """GPU memory used (all processes), utilisation % and power; -1 where NVML is unavailable (same keys on every
    rank, so that they can be reduced)."""
    keys = ("gpu/memory_used_gib", "gpu/utilization", "gpu/power_w")
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid(uuid).encode())
        mem, util = pynvml.nvmlDeviceGetMemoryInfo(h), pynvml.nvmlDeviceGetUtilizationRates(h)
        return {"gpu/memory_used_gib": mem.used / 2**30, "gpu/utilization": float(util.gpu),
                "gpu/power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0}
    except Exception as e:  # noqa: BLE001 - monitoring must never stop training
        log.debug("NVML unavailable: %s", e)
        return dict.fromkeys(keys, -1.0)


def reduce_max(stats: dict[str, float], group: Optional[object] = None) -> dict[str, float]:
    """The maximum of each value over the ranks (every rank calls it with the same keys in the same order)."""
    import torch.distributed as dist

    if not stats:
        return {}
    t = torch.tensor(list(stats.values()), dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(stats, t.tolist()))


def summary_table(metrics_file: Path, domains=None) -> str:
    """Per-domain reward at the start vs the end of a run, each measured the same way: the training reward as the
    mean over the first / last k steps (k = a fifth of the run, 1..10), and, when the run validated, the greedy
    validation reward at the first vs the last validation (step 0 = before any RL update)."""
    rows, _ = read_metrics(metrics_file)
    val = [r for r in rows if any(k.startswith("val/") for k in r)]
    rows = [r for r in rows if r.get("step", 0) > 0 and any(k.startswith("reward/") for k in r)]
    if not rows:
        return "(no metrics)"
    domains = domains or sorted({k.split("/")[1] for r in rows for k in r if k.startswith("reward/")} - {"all"})
    k = min(10, max(1, len(rows) // 5))
    lines = [f"{'domain':<8} {'start':>8} {'end':>8} {'delta':>8}   (train reward: mean of the first vs last {k} "
             f"steps)"]
    for d in domains:
        vals = [r[f"reward/{d}"] for r in rows if f"reward/{d}" in r]
        if not vals:
            continue
        a, b = sum(vals[:k]) / len(vals[:k]), sum(vals[-k:]) / len(vals[-k:])
        lines.append(f"{d:<8} {a:>8.3f} {b:>8.3f} {b - a:>+8.3f}")
    if len(val) >= 2:
        lines.append(f"{'':<8} {'':>8} {'':>8} {'':>8}   (validation, greedy: step {val[0]['step']} vs step "
                     f"{val[-1]['step']})")
        for d in domains:
            key = f"val/{d}/reward"
            if key in val[0] and key in val[-1]:
                a, b = val[0][key], val[-1][key]
                lines.append(f"{'val/' + d:<8} {a:>8.3f} {b:>8.3f} {b - a:>+8.3f}")
    return "\n".join(lines)
