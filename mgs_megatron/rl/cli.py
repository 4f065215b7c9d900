"""`mgs-train CONFIG.yaml [a.b=c ...]` -- one launcher for one process, torchrun and SLURM.

Not under torchrun (no RANK in the environment): with launcher.nproc_per_node > 1 (or --nnodes > 1) it re-launches
itself through `python -m torch.distributed.run --nproc-per-node N` (standalone rendezvous on one node; on several,
one mgs-train per node, e.g. from srun, with --nnodes/--rdzv-endpoint/--rdzv-id: a c10d rendezvous); with 1 it runs
in this process. Under torchrun it trains directly. The config is fully validated (keys, types, paths, rewards)
before any process is started.

Stopping (SLURM preemption, kill): SIGTERM is forwarded to torchrun, which forwards it to the ranks and kills them
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (set here to 240 unless given; keep it below SLURM's --signal lead).
The ranks checkpoint at the next phase boundary (after the rollout, after the train step) and exit.
Exit codes: 0 finished (also when the stop request came after the end), 143 stopped before the end with its
checkpoint written (the same command resumes), 2 config error, anything else: a failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="mgs-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (e.g. examples/tiny_cpu.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. strategy=mixed optim.lr=1e-6")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the launch plan, then exit")
    ap.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node job (one mgs-train per node)")
    ap.add_argument("--rdzv-endpoint", default="", help="multi-node: HOST:PORT of the c10d rendezvous (a node's)")
    ap.add_argument("--rdzv-id", default="mgs", help="multi-node: the job's rendezvous id (e.g. SLURM_JOB_ID)")
    return ap.parse_intermixed_args(argv)


PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
DEFAULT_GRACE_S = 240


def torchrun_command(args, nproc: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if args.nnodes > 1:
        if not args.rdzv_endpoint:
            raise SystemExit("mgs-train: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (one node's address)")
        cmd += ["--nnodes", str(args.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
                "--rdzv-id", args.rdzv_id]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "mgs_megatron.rl.cli", args.config, *args.overrides]


def _resume_line(cfg) -> str:
    from pathlib import Path

    from mgs_megatron.rl.resume import latest_step

    step = latest_step(Path(cfg.run.output_dir) / "checkpoints") if cfg.run.resume == "auto" else None
    return f"steps: {'from the start' if step is None else f'resuming after step {step}'} to {cfg.run.total_steps}"


def _exit_after_stop(cfg, rc: int) -> int:
    """The status of a run that was asked to stop: 0 if it had finished anyway, else 143 (checkpoint written)."""
    from pathlib import Path

    from mgs_megatron.rl.resume import latest_step

    out = Path(cfg.run.output_dir)
    step = latest_step(out / "checkpoints")
    if step is not None and step >= cfg.run.total_steps and (not cfg.run.export_hf or (out / "hf").is_dir()):
        return 0
    print(f"mgs-train: stopped by SIGTERM before the end (torchrun exit {rc}); newest checkpoint: "
          f"{'none' if step is None else f'step {step}'} of {cfg.run.total_steps}; exit {PREEMPTED}",
          file=sys.stderr, flush=True)
    return PREEMPTED


def _run_torchrun(cmd: list[str], cfg) -> int:
    print(f"mgs-train: {_resume_line(cfg)}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(DEFAULT_GRACE_S))
    proc = subprocess.Popen(cmd, env=env)
    stopped = []

    def forward(signum, frame):  # torchrun forwards it to the ranks: they checkpoint at the next phase boundary
        stopped.append(signum)
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
    return _exit_after_stop(cfg, rc) if stopped else rc


def main(argv=None) -> int:
    from mgs_megatron.rl.config import ConfigError, check_paths, load_config

    args = parse(argv)
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:
        cfg = load_config(args.config, args.overrides)
        n = cfg.launcher.nproc_per_node
        check_paths(cfg, int(os.environ["WORLD_SIZE"]) if under_launcher else n * args.nnodes)
    except ConfigError as e:
        print(f"mgs-train: config error: {e}", file=sys.stderr)
        return 2
    if not under_launcher and (n > 1 or args.nnodes > 1):
        cmd = torchrun_command(args, n)
        if args.dry_run:
            print("launch:", " ".join(cmd))
            print(_resume_line(cfg))
            return 0
        return _run_torchrun(cmd, cfg)
    if args.dry_run:
        world = os.environ.get("WORLD_SIZE", "1")
        print(f"run in process: world={world} strategy={cfg.strategy} backend={cfg.rollout.backend} "
              f"output={cfg.run.output_dir}")
        print(_resume_line(cfg))
        return 0
    if not under_launcher:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from mgs_megatron.rl.trainer import run

    try:
        run(cfg)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
