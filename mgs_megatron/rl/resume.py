"""Resume state: the trainer's checkpoints (atomic: temp dir + rename), resumable as if never stopped, and the
preemption request (SIGTERM) that makes every rank checkpoint and stop.

<output_dir>/checkpoints/step_<N>/
    rank_<r>.pt     this rank's model shards (local state dict), optimizer internals (Adam moments, fp32 main
                    params of low-precision models), RNG states, MGS rule state
    trainer.json    step, sampler position, config (rank 0)
<output_dir>/checkpoints/latest   the name of the newest complete checkpoint (written last, atomically)

Resume needs the same world size and layout (the shards are per rank); move a run to another layout through the
model weights (mgs_megatron.weights.save_weights / the final HF export).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


def _inner_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_state(optimizer) -> dict:
    out = []
    for o in _inner_optimizers(optimizer):
        entry = {"inner": o.optimizer.state_dict() if o.optimizer is not None else None}
        groups = getattr(o, "shard_fp32_from_float16_groups", None)
        if groups:
            entry["fp32_from_16"] = [[p.detach().clone() for p in g] for g in groups]
        out.append(entry)
    return {"optimizers": out}


def load_optimizer_state(optimizer, state: dict) -> None:
    for o, entry in zip(_inner_optimizers(optimizer), state["optimizers"]):
        if entry["inner"] is not None:
            o.optimizer.load_state_dict(entry["inner"])
        if "fp32_from_16" in entry:
            with torch.no_grad():
                for g, saved in zip(o.shard_fp32_from_float16_groups, entry["fp32_from_16"]):
                    for p, s in zip(g, saved):
                        p.copy_(s)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def load_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest(root: Path) -> Optional[Path]:
    f = root / "latest"
    if not f.is_file():
        return None
    p = root / f.read_text().strip()
    return p if (p / "trainer.json").is_file() else None


def latest_step(root: Path) -> Optional[int]:
    """The step of the newest complete checkpoint under `root` (None: none)."""
    path = latest(Path(root))
    return None if path is None else int(json.loads((path / "trainer.json").read_text())["step"])


def save(root: Path, step: int, chunks, optimizer, trainer_state: dict, extra_rank_state: dict,
         keep: int = 2) -> Path:
    """Every rank calls; returns the final directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    state = {"model": [c.state_dict() for c in chunks], "optimizer": optimizer_state(optimizer),
             "rng": rng_state(), **extra_rank_state}
    torch.save(state, tmp / f"rank_{rank}.pt.part")
    os.replace(tmp / f"rank_{rank}.pt.part", tmp / f"rank_{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (root / "latest.part").write_text(final.name)
        os.replace(root / "latest.part", root / "latest")
        steps = sorted((int(p.name.split("_")[1]) for p in root.glob("step_*") if p.name.split("_")[1].isdigit()))
        for s in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step_{s}", ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def load(path: Path, chunks, optimizer) -> tuple[dict, dict]:
    """Load this rank's part; returns (trainer_state, the rank's extra state)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    f = path / f"rank_{rank}.pt"
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {f.name}: was it written with another world size?")
    state = torch.load(f, weights_only=False)
    for c, sd in zip(chunks, state["model"]):
        c.load_state_dict(sd)
    load_optimizer_state(optimizer, state["optimizer"])
    load_rng_state(state["rng"])
    trainer_state = json.loads((path / "trainer.json").read_text())
    return trainer_state, state


def wait_for(path: Path, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not path.exists() and time.time() - t0 < timeout:
        time.sleep(0.1)


class Checkpointer:
    """The run's checkpoints: when to write one (every `every` steps, when stopping, and at the end), writing it,
    and finding the newest to resume from.

    Args:
        root: <output_dir>/checkpoints.
        every: save every N steps (0: only when stopping and at the end).
        keep: checkpoints kept.
    """

    def __init__(self, root: Path, *, every: int, keep: int):
        self.root, self.every, self.keep = Path(root), every, keep
        self.last_saved: Optional[int] = None

    def due(self, step: int, stopping: bool = False) -> bool:
        return stopping or bool(self.every and step % self.every == 0)

    def save(self, step: int, chunks, optimizer, trainer_state: dict, extra_rank_state: dict) -> Path:
        path = save(self.root, step, chunks, optimizer, trainer_state, extra_rank_state, keep=self.keep)
        self.last_saved = step
        return path

    def latest(self) -> Optional[Path]:
        return latest(self.root)


class Preemption:
    """SIGTERM (SLURM preemption, kill) sets a flag; `requested()` agrees on it over all ranks (a collective), so
    that every rank finishes the same step, checkpoints and exits together."""

    def __init__(self):
        self._flag = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._flag = True

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
