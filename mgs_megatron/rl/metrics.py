"""A step's metrics: how they are computed (per domain, per phase, per module) and where they go.

`MetricsWriter` (rank 0 only) appends one JSON line per step to RUN/metrics.jsonl (always), and mirrors the
scalars to TensorBoard (`run.tensorboard`) and Weights & Biases (`run.wandb`; optional, `pip install wandb`).
`PhaseTimer` times the step's phases into time/<phase>; `domain_metrics` gives reward / accuracy / length per
domain; `module_cosines` the per-module gradient cosines that tools/plot_conflicts.py draws; `summary_table` the
start / end table a run prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
        """After a resume, drop lines of steps past the checkpoint (they will be redone)."""
        if not self.file.exists():
            return
        lines = [ln for ln in self.file.read_text().splitlines() if ln.strip()]
        self.file.write_text("".join(ln + "\n" for ln in lines if json.loads(ln).get("step", 0) <= step))

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
    rows = [json.loads(ln) for ln in Path(metrics_file).read_text().splitlines() if ln.strip()]
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
