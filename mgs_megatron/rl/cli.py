"""`mgs-train CONFIG.yaml [a.b=c ...]` -- one launcher for one process, torchrun and SLURM.

Not under torchrun (no RANK in the environment): with launcher.nproc_per_node > 1 it re-launches itself through
`python -m torch.distributed.run --nproc-per-node N` (standalone rendezvous); with 1 it runs in this process.
Under torchrun (also `srun ... torchrun ...` on SLURM, see examples/slurm/) it trains directly.
The config is fully validated (keys, types, paths, rewards) before any process is started.
"""

from __future__ import annotations

import argparse
import os
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
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    from mgs_megatron.rl.config import ConfigError, check_paths, load_config

    args = parse(argv)
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg, int(os.environ["WORLD_SIZE"]) if under_launcher else cfg.launcher.nproc_per_node)
    except ConfigError as e:
        print(f"mgs-train: config error: {e}", file=sys.stderr)
        return 2
    n = cfg.launcher.nproc_per_node
    if not under_launcher and n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--standalone",
               "-m", "mgs_megatron.rl.cli", args.config, *args.overrides]
        if args.dry_run:
            print("launch:", " ".join(cmd))
            return 0
        proc = subprocess.Popen(cmd)
        import signal

        # forward SIGTERM (SLURM preemption, kill) to torchrun, which forwards it to the ranks: they finish the
        # step, checkpoint and exit
        signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(signal.SIGTERM))
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            return proc.wait()
    if args.dry_run:
        world = os.environ.get("WORLD_SIZE", "1")
        print(f"run in process: world={world} strategy={cfg.strategy} backend={cfg.rollout.backend} "
              f"output={cfg.run.output_dir}")
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
