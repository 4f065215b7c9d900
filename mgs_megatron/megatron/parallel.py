"""Process groups in one place: start torch.distributed and Megatron's parallel_state for a ParallelConfig."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from mgs_megatron import devices
from mgs_megatron.megatron import cpu_backend
from mgs_megatron.megatron.model import ParallelConfig

DEFAULT_TIMEOUT_S = 3600.0


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'auto'")
    return device


def initialize(parallel: ParallelConfig, *, seed: int = 1234, device: str = "auto",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Initialise the default process group (from the torchrun env vars) and Megatron's model-parallel groups.

    device='cpu' activates the CPU backend and uses gloo; 'cuda' uses NCCL (single-backend groups: see devices.py).
    `timeout_s` bounds every collective: long by default, because rank 0 converts or exports a whole model while
    the other ranks wait in a barrier. Returns the resolved device.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    device = resolve_device(device)
    if device == "cpu":
        cpu_backend.activate()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    devices.set_compute_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo" if device == "cpu" else "nccl",
                                timeout=datetime.timedelta(seconds=timeout_s))
    parallel_kwargs = dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
    )
    if dist.get_world_size() % (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size):
        raise ValueError(f"world size {dist.get_world_size()} is not divisible by tensor_model_parallel_size x "
                         f"pipeline_model_parallel_size = {parallel_kwargs}")
    ps.initialize_model_parallel(**parallel_kwargs, distributed_timeout_minutes=max(1, int(timeout_s // 60)))
    model_parallel_cuda_manual_seed(seed)
    return device


def destroy() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
