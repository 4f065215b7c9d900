"""Run a function on N local ranks (spawned processes) with a Megatron parallel layout, and gather the results.

Ranks are spawned processes kept in a pool per world size, so that the expensive imports (torch, Megatron) are
paid once per test session. Every call gets a fresh port, a fresh process group and fresh Megatron parallel state;
a failure or timeout kills the whole pool (no state leaks into the next call) and re-raises the failing rank's
traceback in the caller.
"""

from __future__ import annotations

import atexit
import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional


class DistributedTestError(RuntimeError):
    pass


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: Optional[int] = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-dp{self.dp}" + (f"-vpp{self.vpp}" if self.vpp else "")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj) -> bytes:
    # torch.save instead of the queue's pickler: shared-memory tensor handles die with the worker that made them.
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _run_task(rank: int, world: int, task: dict):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(task["port"]), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    layout = task["layout"]
    if layout is not None:
        from mgs_megatron.megatron import parallel
        from mgs_megatron.megatron.model import ParallelConfig

        parallel.initialize(ParallelConfig(layout.tp, layout.pp, layout.vpp), seed=task["seed"], device=task["device"])
    else:
        dist.init_process_group("gloo" if task["device"] == "cpu" else "nccl", rank=rank, world_size=world)
    try:
        out = task["fn"](*task["args"], **task["kwargs"])
        dist.barrier()
    finally:
        if layout is not None:
            parallel.destroy()
        elif dist.is_initialized():
            dist.destroy_process_group()
    return out


def _worker_loop(rank: int, world: int, device: str, inbox, outbox) -> None:
    if device == "cpu":  # CPU ranks on a GPU node too (the conversion check, the test suite): hide the GPUs before
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # anything initialises CUDA, so the CPU backend may activate
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=UserWarning)  # Megatron's "apex/TE not installed" noise
    torch.set_num_threads(1)
    while True:
        task = inbox.get()
        if task is None:
            return
        try:
            outbox.put((task["id"], rank, "ok", _dumps(_run_task(rank, world, task))))
        except BaseException:  # noqa: BLE001 - every failure must reach the parent
            outbox.put((task["id"], rank, "error", traceback.format_exc()))


class _Pool:
    def __init__(self, world: int, device: str):
        ctx = mp.get_context("spawn")
        self.world = world
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=_worker_loop, args=(r, world, device, self.inboxes[r], self.outbox),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()
        self.next_id = 0

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for q in self.inboxes:
            try:
                q.put_nowait(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


_POOLS: dict[tuple[int, str], _Pool] = {}


def _close_all() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()


atexit.register(_close_all)


def run_distributed(fn: Callable, layout: Layout | int, *args, timeout: float = 240.0, seed: int = 1234,
                    rank_device: str = "cpu", **kwargs) -> list[Any]:
    """Run fn(*args, **kwargs) on every rank; return the per-rank results ordered by rank.

    `layout` is a Layout (Megatron parallel_state is initialised) or an int world size (a plain process group only).
    rank_device "cpu": gloo and the CPU backend, with the GPUs hidden from the ranks (so this works on a GPU node
    too); "cuda": NCCL, one GPU per rank. fn must be importable (module level); args and results travel through
    torch.save.
    """
    for attempt in range(3):
        try:
            return _run_once(fn, layout, args, kwargs, timeout, seed, rank_device)
        except DistributedTestError as e:
            # The free port is only free when chosen: another process can take it before the store binds it.
            if attempt == 2 or "EADDRINUSE" not in str(e) and "Address already in use" not in str(e):
                raise


# A rank that fails tears down its process group, so its peers then fail inside a collective with one of these.
_PEER_LOSS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def _is_peer_loss(tb: str) -> bool:
    return any(marker in tb for marker in _PEER_LOSS)


def _collect_failures(pool: "_Pool", task_id: int, failures: dict[int, str], pending: int,
                      grace: float = 10.0) -> dict[int, str]:
    """After a first failure, wait briefly for the other ranks' reports: the first to arrive is often only a peer
    that lost its connection to the rank that really failed."""
    deadline = time.monotonic() + grace
    while len(failures) < pending and time.monotonic() < deadline:
        try:
            tid, rank, status, value = pool.outbox.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            continue
        if tid == task_id:
            if status == "error":
                failures[rank] = value
            else:
                pending -= 1
    return failures


def _failure_report(what: str, failures: dict[int, str]) -> str:
    """The root cause first: ranks whose failure is not a lost peer, then the rest, by arrival order."""
    ranks = sorted(failures, key=lambda r: _is_peer_loss(failures[r]))  # stable: keeps arrival order otherwise
    report = [f"{what}: rank {ranks[0]} failed:\n{failures[ranks[0]]}"]
    report += [f"(then rank {r} failed:\n{failures[r]})" for r in ranks[1:]]
    return "\n".join(report)


def _run_once(fn: Callable, layout, args: tuple, kwargs: dict, timeout: float, seed: int,
              device: str) -> list[Any]:
    world = layout if isinstance(layout, int) else layout.world_size
    key = (world, device)
    pool = _POOLS.get(key)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _POOLS[key] = _Pool(world, device)
    pool.next_id += 1
    task = dict(id=pool.next_id, fn=fn, args=args, kwargs=kwargs, port=free_port(), seed=seed, device=device,
                layout=None if isinstance(layout, int) else layout)
    for q in pool.inboxes:
        q.put(task)
    gathered: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    ok = False
    try:
        while len(gathered) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedTestError(f"{fn.__name__} at {layout}: timed out after {timeout:.0f}s "
                                           f"(ranks done: {sorted(gathered)})")
            try:
                task_id, rank, status, value = pool.outbox.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(pool.procs) if not p.is_alive()]
                if dead:
                    raise DistributedTestError(f"{fn.__name__} at {layout}: rank(s) {dead} died with exit codes "
                                               f"{[pool.procs[r].exitcode for r in dead]}") from None
                continue
            if task_id != task["id"]:
                continue
            if status == "error":
                failures = _collect_failures(pool, task["id"], {rank: value}, world - len(gathered))
                raise DistributedTestError(_failure_report(f"{fn.__name__} at {layout}", failures))
            gathered[rank] = _loads(value)
        ok = True
    finally:
        if not ok:
            pool.close()
            _POOLS.pop(key, None)
    return [gathered[r] for r in range(world)]
