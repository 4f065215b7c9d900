"""Resume state: the trainer's checkpoints (atomic: temp dir + rename), resumable as if never stopped, and the
preemption request (SIGTERM) that makes every rank checkpoint and stop.

<output_dir>/checkpoints/step_<N>/
    rank_<r>.pt     this rank's model shards (local state dict), optimizer internals (Adam moments, fp32 main
                    params of low-precision models), RNG states, MGS rule state
    trainer.json    step, sampler position, config (rank 0)
    model/          run.checkpoint_format torch_dist: the model in Megatron-LM's format (tracker + iter_<N>/;
                    Megatron-LM, verl and slime load it); rank_<r>.pt then holds no model
<output_dir>/checkpoints/latest   the name of the newest complete checkpoint (written last, atomically)

Resume at the same layout restores everything. At another layout (world size, TP, PP) only a torch_dist model
moves: the model weights load at any layout, the per-rank optimizer state and RNG streams restart (the MGS rule
state, identical on every rank, is taken from rank 0's file); per-rank model shards cannot move.
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

from mgs_megatron.devices import HOST, collective_device, compute_device


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
    """Every generator a resumed run must continue: CPU, CUDA (this rank's device) and Megatron's model-parallel
    RNG tracker (dropout / init streams; on the CPU backend they are CPU generator states), numpy, Python."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "megatron_tracker": get_cuda_rng_tracker().get_states()}
    if compute_device().type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and compute_device().type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("megatron_tracker"):
        get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def latest(root: Path) -> Optional[Path]:
    f = root / "latest"
    if not f.is_file():
        return None
    p = root / f.read_text().strip()
    return p if (p / "trainer.json").is_file() else None


MODEL_DIR = "model"


def layout() -> dict:
    """What per-rank files depend on: the world size and Megatron's model-parallel layout."""
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size()}


def save(root: Path, step: int, chunks, optimizer, trainer_state: dict, extra_rank_state: dict,
         keep: int = 2, save_model=None) -> Path:
    """Every rank calls; returns the final directory. `save_model(dir)` (every rank): write the model there in
    another format (torch_dist) instead of into the per-rank files."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    if save_model is not None:
        save_model(tmp / MODEL_DIR)
    state = {"optimizer": optimizer_state(optimizer), "rng": rng_state(), **extra_rank_state}
    if save_model is None:
        state["model"] = [c.state_dict() for c in chunks]
    torch.save(state, tmp / f"rank_{rank}.pt.part")
    os.replace(tmp / f"rank_{rank}.pt.part", tmp / f"rank_{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "layout": layout()}, indent=1, default=str))
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


def load(path: Path, chunks, optimizer, load_model=None) -> tuple[dict, dict]:
    """Load this rank's part; returns (trainer_state, the rank's extra state). `load_model(dir)` (every rank)
    loads a model saved by `save_model`; at another layout only it and rank 0's MGS state are restored."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer_state = json.loads((path / "trainer.json").read_text())
    saved, now = trainer_state.get("layout", {"world_size": trainer_state.get("world_size")}), layout()
    moved = any(saved.get(k) != v for k, v in now.items() if k in saved)
    has_model = (path / MODEL_DIR).is_dir()
    if moved and not has_model:
        raise RuntimeError(f"checkpoint {path} was written at layout {saved}, this job is {now}: its model is in "
                           f"per-rank files, which only resume at the same layout (run.checkpoint_format=torch_dist "
                           f"writes checkpoints that resume at any layout)")
    if has_model:
        load_model(path / MODEL_DIR)
    if moved:
        optimizer.reload_model_params()  # low-precision models: fp32 main params from the loaded weights
        first = torch.load(path / "rank_0.pt", map_location=HOST, weights_only=False)
        return trainer_state, {"mgs": first.get("mgs"), "moved_from": saved}
    state = torch.load(path / f"rank_{rank}.pt", map_location=HOST, weights_only=False)  # copied to each device
    for c, sd in zip(chunks, state.get("model", [])):
        c.load_state_dict(sd)
    load_optimizer_state(optimizer, state["optimizer"])
    load_rng_state(state["rng"])
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

    def save(self, step: int, chunks, optimizer, trainer_state: dict, extra_rank_state: dict, save_model=None) -> Path:
        path = save(self.root, step, chunks, optimizer, trainer_state, extra_rank_state, keep=self.keep,
                    save_model=save_model)
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
        flag = torch.tensor([1.0 if self._flag else 0.0], device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
