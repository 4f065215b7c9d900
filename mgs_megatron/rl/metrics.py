"""Where a step's metrics go, and the metrics that are not RL math: memory and GPU state, per-domain accuracy.

`MetricsWriter` (rank 0 only) appends one JSON line per step to RUN/metrics.jsonl (always), and mirrors the
scalars to TensorBoard (`run.tensorboard`) and Weights & Biases (`run.wandb`; optional, `pip install wandb`).
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Optional, Sequence

import torch

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
def accuracy(scores: Sequence[float], threshold: float = 1.0) -> float:
    """Fraction of samples at full marks (math answer verified; every IFEval instruction followed)."""
    return sum(s >= threshold for s in scores) / len(scores) if scores else 0.0


def system_stats(device: str) -> dict[str, float]:
    """This process's memory (peak RSS) and, on CUDA, torch's allocator peaks and the GPU's own view (NVML)."""
    out = {"mem/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if device == "cuda" and torch.cuda.is_available():
        out["mem/gpu_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        out["mem/gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out.update(_nvml_stats(torch.cuda.current_device()))
    return out


def _nvml_stats(index: int) -> dict[str, float]:
    """GPU memory used (all processes), utilisation % and power; -1 where NVML is unavailable (same keys on every
    rank, so that they can be reduced)."""
    keys = ("gpu/memory_used_gib", "gpu/utilization", "gpu/power_w")
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
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
    t = torch.tensor(list(stats.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(stats, t.tolist()))
