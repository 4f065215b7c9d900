"""Run a function in persistent worker processes with a hard per-item timeout.

Why processes: math-verify's own timeouts use SIGALRM (integer seconds, main thread only, and they cancel any
alarm the caller set), so they cannot be trusted inside a trainer that may call rewards from threads, and a
thread cannot be killed. Instead the function runs in worker processes with the library's timeouts disabled; the
parent waits on each item with a deadline and, on expiry, kills that worker (the only reliable way to stop a hung
sympy call), marks the item "timeout" and respawns the worker for the remaining items.

Workers are persistent (start-up, e.g. importing sympy, is paid once, not per item) and each is its own program,
`python -m mgs_megatron.rewards.worker FD TARGET`, talking to the parent over a socket: not `fork`ed (the trainer
process holds torch/gloo/vLLM threads, which fork would copy in an undefined state) and not multiprocessing's
`spawn`, which re-runs the caller's main module in the child (a script without an `if __name__ == "__main__":`
guard then scored every item 0 with an EOFError). The child gets the parent's sys.path, so the target imports
the same modules; it runs in its own session, so a Ctrl-C or a SIGTERM meant for the trainer's process group does
not kill it mid-step (it exits when the parent closes the socket).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

from .base import (
    DEFAULT_TIMEOUT_S,
    FAILED,
    OK,
    TIMEOUT,
    Reward,
    RewardInput,
    ScoreOutcome,
    import_by_path,
    register_reward,
)


def _worker_main(conn, target: str) -> None:
    try:
        fn = import_by_path(target)
        conn.send(("ready", None, None))
    except BaseException as e:  # report import errors instead of dying silently
        conn.send(("init_error", None, f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        for idx, args in msg:
            try:
                conn.send((OK, idx, float(fn(*args))))
            except BaseException as e:
                conn.send((FAILED, idx, f"{type(e).__name__}: {e}"))


def check_target(target: str) -> None:
    """A target the worker program can import: not a function of the running script (`__main__`)."""
    module = target.partition(":")[0] if ":" in target else target.rpartition(".")[0]
    if module == "__main__" or module.startswith("__main__."):
        raise ValueError(f"reward {target!r} is defined in the script being run (__main__), which a reward worker "
                         f"process cannot import: move it into a module (or set rewards.timeout_s: null to run it "
                         f"in this process, without a deadline)")


class _Proc:
    def __init__(self, target: str, startup_timeout: float):
        mine, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "mgs_megatron.rewards.worker", str(theirs.fileno()),
                                          target], pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            theirs.close()
        self.conn = Connection(mine.detach())
        if not self.conn.poll(startup_timeout):
            self.kill()
            raise RuntimeError(f"reward worker for {target} did not start within {startup_timeout}s")
        try:
            kind, _, err = self.conn.recv()
        except (EOFError, OSError):
            kind, err = "died", f"the worker process exited with code {self.proc.wait(5)}"
        if kind != "ready":
            self.kill()
            raise RuntimeError(f"reward worker for {target} failed to start: {err}")
        self.pending: list[tuple[int, tuple]] = []
        self.deadline = float("inf")

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.is_alive():
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class ProcessPoolRunner:
    """`run(args_list, timeout_s)` -> one ScoreOutcome per args tuple; `target` is a dotted path to a
    picklable-by-name function returning a float. Not thread-safe: use one runner per thread."""

    def __init__(self, target: str, num_workers: int = 1, startup_timeout: float = 120.0):
        check_target(target)
        self.target = target
        self.num_workers = max(1, int(num_workers))
        self.startup_timeout = startup_timeout
        self._procs: list[_Proc] = []
        self.restarts = 0

    def _ensure(self) -> None:
        self._procs = [p for p in self._procs if p.is_alive()]
        while len(self._procs) < self.num_workers:
            self._procs.append(_Proc(self.target, self.startup_timeout))

    def _dispatch(self, p: _Proc, timeout_s: float) -> None:
        p.conn.send(list(p.pending))
        p.deadline = time.monotonic() + timeout_s

    def run(self, args_list: Sequence[tuple], timeout_s: float) -> list[ScoreOutcome]:
        out: list[ScoreOutcome | None] = [None] * len(args_list)
        if not args_list:
            return []
        self._ensure()
        # contiguous chunks, one per worker
        n, w = len(args_list), len(self._procs)
        bounds = [n * i // w for i in range(w + 1)]
        active: list[_Proc] = []
        for i, p in enumerate(self._procs):
            p.pending = [(j, tuple(args_list[j])) for j in range(bounds[i], bounds[i + 1])]
            if p.pending:
                self._dispatch(p, timeout_s)
                active.append(p)
        while active:
            now = time.monotonic()
            ready = wait([p.conn for p in active], timeout=max(0.0, min(p.deadline for p in active) - now))
            for p in list(active):
                if p.conn in ready:
                    try:
                        status, idx, val = p.conn.recv()
                    except (EOFError, OSError):  # worker died (e.g. segfault/OOM): fail current item
                        code = p.proc.poll()
                        status, idx, val = FAILED, p.pending[0][0], f"reward worker died (exit code {code})"
                        self._replace(p, active, out, status, val, timeout_s)
                        continue
                    out[idx] = ScoreOutcome(val, OK) if status == OK else ScoreOutcome(0.0, FAILED, val)
                    p.pending = [x for x in p.pending if x[0] != idx]
                    p.deadline = time.monotonic() + timeout_s
                    if not p.pending:
                        active.remove(p)
                elif time.monotonic() >= p.deadline:
                    self._replace(p, active, out, TIMEOUT, f"timed out after {timeout_s:g}s", timeout_s)
        return [o if o is not None else ScoreOutcome(0.0, FAILED, "no result") for o in out]

    def _replace(self, p: _Proc, active: list, out: list, status: str, msg: str, timeout_s: float) -> None:
        """Kill `p`, mark its current item, restart a worker for the rest of its items."""
        idx = p.pending[0][0]
        out[idx] = ScoreOutcome(0.0, status, msg)
        rest = p.pending[1:]
        p.kill()
        self.restarts += 1
        active.remove(p)
        self._procs.remove(p)
        q = _Proc(self.target, self.startup_timeout)
        self._procs.append(q)
        q.pending = rest
        if rest:
            self._dispatch(q, timeout_s)
            active.append(q)

    def close(self) -> None:
        for p in self._procs:
            p.stop()
        self._procs = []

    def __del__(self):  # best effort; orphaned workers exit when the parent's end of the socket closes
        try:
            self.close()
        except Exception:
            pass


def call_target(target: str, *args: Any) -> Any:
    """In-process call by dotted path (the 'inline' executor)."""
    return import_by_path(target)(*args)


@register_reward("process_function")
class ProcessFunctionReward(Reward):
    """A user `fn(prompt, response, sample) -> float` (dotted path `target`) run in worker processes with a hard
    per-item timeout: use it for rewards that may hang (code execution, heavy sympy, ...)."""

    def __init__(self, target: str, timeout_s: float = DEFAULT_TIMEOUT_S, num_workers: int = 1):
        self.name, self.timeout_s = target, float(timeout_s)
        self._runner = ProcessPoolRunner(target, num_workers)

    def score_batch(self, items: Sequence[RewardInput]) -> list[ScoreOutcome]:
        return self._runner.run([(it.prompt, it.response, dict(it.sample)) for it in items], self.timeout_s)

    def close(self) -> None:
        self._runner.close()


if __name__ == "__main__":  # the worker program: python -m mgs_megatron.rewards.worker FD TARGET
    _worker_main(Connection(int(sys.argv[1])), sys.argv[2])
