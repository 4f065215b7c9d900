"""Resume state: the trainer's checkpoints (atomic: temp dir + rename), resumable as if never stopped, and the
preemption request (SIGTERM) that makes every rank checkpoint and stop.

<output_dir>/checkpoints/step_<N>/
    rank_<r>.pt     this rank's model shards (local state dict), optimizer internals (Adam moments, fp32 main
                    params of low-precision models), RNG states, MGS rule state
    trainer.json    step, sampler position, config (rank 0)
    model/          run.checkpoint_format torch_dist: the model in Megatron-LM's format (tracker + iter_<N>/;
                    Megatron-LM, verl and slime load it); rank_<r>.pt then holds no model
<output_dir>/checkpoints/latest   the name of the newest complete checkpoint (written last, atomically; a hint for
                                  people and tools: resume scans the step_<N> directories and never needs it)

Resume (`Checkpointer.load_newest`) takes the newest checkpoint that every rank can read; a damaged or incomplete
one (a truncated rank file, no trainer.json) is skipped with a warning naming the file, and older ones are tried.
Nothing is deleted when a run starts: rotation removes only checkpoints older than the one just written, and
`check_output_dir` (before launch) refuses run.resume=never in a directory that holds checkpoints.
Resume at the same layout restores everything. At another layout (world size, TP, PP) only a torch_dist model
moves: the model weights load at any layout, the per-rank optimizer state and RNG streams restart (the MGS rule
state, identical on every rank, is taken from rank 0's file); per-rank model shards cannot move (CheckpointError).
"""

from __future__ import annotations

import json
import logging
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
from mgs_megatron.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


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


def step_dirs(root: Path) -> list[Path]:
    """The step_<N> directories under root, newest first (other names are not checkpoints)."""
    found = [p for p in Path(root).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def missing_files(path: Path, world_size: int) -> list[str]:
    """Files a complete checkpoint of `world_size` ranks has and `path` lacks."""
    need = ["trainer.json"] + [f"rank_{r}.pt" for r in range(world_size)]
    return [f for f in need if not (path / f).is_file()]


def latest(root: Path, world_size: Optional[int] = None) -> Optional[Path]:
    """The newest complete checkpoint under root (found by scanning; `world_size` None: this job's)."""
    world = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    return next((p for p in step_dirs(root) if not missing_files(p, world)), None)


def latest_step(root: Path, world_size: Optional[int] = None) -> Optional[int]:
    """The step of the newest complete checkpoint of `world_size` ranks under `root` (None: none)."""
    path = latest(Path(root), world_size)
    return None if path is None else int(path.name[5:])


MODEL_DIR = "model"


def layout() -> dict:
    """What per-rank files depend on: the world size and Megatron's model-parallel layout."""
    from megatron.core import parallel_state as ps

    out = {"world_size": dist.get_world_size() if dist.is_initialized() else 1}
    if ps.model_parallel_is_initialized():  # (a plain process group: the world size is all there is)
        out.update(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                   vpp=ps.get_virtual_pipeline_model_parallel_world_size())
    return out


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
        if final.exists():  # a checkpoint of this step that could not be loaded (resume fell back past it)
            log.warning("replacing %s, which resume could not use", final)
            shutil.rmtree(final)
        os.replace(tmp, final)
        (root / "latest.part").write_text(final.name)
        os.replace(root / "latest.part", root / "latest")
        world = dist.get_world_size() if dist.is_initialized() else 1
        older = [p for p in step_dirs(root) if int(p.name[5:]) < step and not missing_files(p, world)]
        for p in older[max(keep - 1, 0):] if keep > 0 else []:  # complete and older only: never a newer one
            shutil.rmtree(p, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def read(path: Path, rank: Optional[int] = None) -> tuple[dict, dict]:
    """(trainer_state, rank `rank`'s state (default: this rank's)) of a checkpoint, touching no model;
    CheckpointError naming the file that is missing or cannot be read (a truncated rank file, a torn trainer.json)."""
    rank = _rank() if rank is None else rank
    f = path / f"rank_{rank}.pt"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: was the checkpoint written with another world size?")
    try:
        state = torch.load(f, map_location=HOST, weights_only=False)  # load_state_dict copies onto each param's device
    except Exception as e:  # noqa: BLE001 - torch's zip reader names no file: name it
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{f} is damaged ({type(e).__name__}: {first})") from None
    try:
        trainer_state = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'trainer.json'} is damaged ({type(e).__name__}: {e})") from None
    return trainer_state, state


def apply(state: dict, chunks, optimizer) -> None:
    """Load a rank state (from `read`) into the model chunks (none when the model is in model/), the optimizer and
    the RNGs."""
    for c, sd in zip(chunks, state.get("model", [])):
        c.load_state_dict(sd)
    load_optimizer_state(optimizer, state["optimizer"])
    load_rng_state(state["rng"])


def moved_from(path: Path) -> Optional[dict]:
    """The layout a checkpoint was written at, when it differs from this job's (None: the same, or unknown)."""
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError):
        return None
    saved, now = state.get("layout", {"world_size": state.get("world_size")}), layout()
    return saved if any(saved.get(k) not in (None, v) for k, v in now.items()) else None


def load_newest(root: Path, chunks, optimizer, load_model=None) -> Optional[tuple[Path, dict, dict]]:
    """Every rank calls. Loads the newest checkpoint that every rank can read -> (path, trainer_state, this rank's
    state), or None when root holds no checkpoint. A damaged or incomplete one is skipped with a warning (rank 0)
    naming the file; CheckpointError when checkpoints exist but none can be loaded. `load_model(dir)` (every rank)
    loads a model saved in model/ (run.checkpoint_format=torch_dist); such a checkpoint also loads at another
    layout: then only the model and rank 0's MGS rule state are restored (the state has "moved_from")."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    skipped: list[str] = []
    for path in step_dirs(root):
        problem, loaded = None, None
        saved = moved_from(path)
        has_model = (path / MODEL_DIR).is_dir()
        if saved is not None and not has_model:
            raise CheckpointError(f"{path} was written at layout {saved}, this job is {layout()}: its model is in "
                                  f"per-rank files, which resume at the same layout only (run.checkpoint_format="
                                  f"torch_dist writes checkpoints that resume at any layout)")
        missing = missing_files(path, 1 if saved is not None else world)
        if missing:
            problem = f"{path} is incomplete (no {', '.join(missing)})"
        else:
            try:
                loaded = read(path, rank=0 if saved is not None else None)
            except CheckpointError as e:
                problem = str(e)
        problems = _gather(problem)
        if any(problems):
            skipped.append("; ".join(sorted({p for p in problems if p})))
            continue
        trainer_state, state = loaded
        if has_model:
            load_model(path / MODEL_DIR)
        if saved is not None:
            optimizer.reload_model_params()  # low-precision models: fp32 main params from the loaded weights
            state = {"mgs": state.get("mgs"), "moved_from": saved}
        else:
            apply(state, chunks, optimizer)
        if skipped and _rank() == 0:
            log.warning("%s; resuming from the newest complete checkpoint %s instead", "; ".join(skipped), path)
        return path, trainer_state, state
    if skipped:
        raise CheckpointError(f"no checkpoint in {root} can be loaded: {'; '.join(skipped)}. Move them away (or set "
                              f"run.resume=overwrite to start over and delete them)")
    return None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather(problem: Optional[str]) -> list[Optional[str]]:
    """Every rank's problem with a checkpoint (None: fine), so that all ranks take the same one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [problem]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, problem)
    return out


def check_output_dir(run) -> None:
    """Before any work (RunConfig `run`): <output_dir> and its checkpoints/ are writable, and run.resume=never does
    not start over in a directory that holds checkpoints (ConfigError naming the key)."""
    out = Path(run.output_dir)
    ckpt = out / "checkpoints"
    for d in (out, ckpt):
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write_probe_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"config key 'run.output_dir': {str(d)!r} is not writable ({type(e).__name__}: "
                              f"{e.strerror or e}); checkpoints and metrics go there") from None
    found = step_dirs(ckpt)
    if run.resume == "never" and found:
        raise ConfigError(f"config key 'run.resume': 'never' starts over, but {ckpt} holds checkpoints "
                          f"({', '.join(p.name for p in found[:3])}{', ...' if len(found) > 3 else ''}); refusing to "
                          f"overwrite them: set run.resume=auto to continue from them, run.resume=overwrite to delete "
                          f"them, or another run.output_dir")


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

    def load_newest(self, chunks, optimizer, load_model=None) -> Optional[tuple[Path, dict, dict]]:
        found = load_newest(self.root, chunks, optimizer, load_model)
        if found is not None:
            self.last_saved = int(found[1]["step"])
        return found

    def clear(self) -> None:
        """run.resume=overwrite: rank 0 deletes the checkpoints under root (every rank calls)."""
        if _rank() == 0:
            for p in step_dirs(self.root):
                shutil.rmtree(p)
            (self.root / "latest").unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()


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
