"""Where tensors live, decided in one place.

    compute_device()          the model's device: cuda:<LOCAL_RANK> on GPUs, cpu under the CPU backend
    collective_device(group)  where a tensor given to a torch.distributed collective on `group` must be
    HOST                      the CPU, for metrics, Python lists and logging
    to_compute(batch)         a micro-batch (dict of tensors) on the compute device (pinned, non_blocking)

Process groups are single-backend: NCCL on GPUs, gloo on CPU. We do not initialise the default group as
"cpu:gloo,cuda:nccl": Megatron creates its sub-groups from the default backend, so every TP/PP/DP group would also
open a gloo communicator (TCP connections and set-up time at thousands of ranks), a CPU tensor in a hot path would
quietly go over TCP instead of failing, and vLLM's external_launcher reuses the default group. Instead every
collective input is created on `collective_device(group)`, and tests/test_device_discipline.py fails when product
code creates a tensor without an explicit device.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

HOST = torch.device("cpu")
_compute: Optional[torch.device] = None


def set_compute_device(device: str) -> torch.device:
    """Called once by megatron/parallel.initialize: 'cuda' -> cuda:<LOCAL_RANK>, 'cpu' -> cpu."""
    global _compute
    _compute = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda" else HOST
    return _compute


def compute_device() -> torch.device:
    """The device the model and its inputs live on (cpu until process groups are initialised)."""
    return _compute if _compute is not None else HOST


def collective_device(group=None) -> torch.device:
    """The device a collective on `group` (default: the world group) takes its tensors on: the current CUDA device
    for NCCL, the CPU for gloo."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return HOST


def to_compute(batch: dict) -> dict:
    """Every tensor of a micro-batch on the compute device. From the CPU to a GPU the copy goes through pinned
    memory, non-blocking, so it overlaps the previous micro-batch's compute; on the CPU it is a no-op."""
    device = compute_device()
    if device.type == "cpu":
        return batch
    return {k: (v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device.type == "cpu"
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


__all__ = ["HOST", "collective_device", "compute_device", "set_compute_device", "to_compute"]
