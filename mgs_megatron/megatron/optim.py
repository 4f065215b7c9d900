"""Wrap model chunks in Megatron DDP and build Megatron's optimizer (explicit dataclass configs, Megatron's own)."""

from __future__ import annotations

from typing import Sequence

import torch


def wrap_ddp(chunks: Sequence[torch.nn.Module], ddp_config, *, device: str = "cpu"):
    """Megatron DistributedDataParallel around each model chunk (first chunk owns bucket 0)."""
    from megatron.core.distributed import DistributedDataParallel as DDP

    wrapped = []
    for i, chunk in enumerate(chunks):
        if device == "cuda":
            chunk.cuda(torch.cuda.current_device())
        wrapped.append(DDP(config=chunk.config, ddp_config=ddp_config, module=chunk,
                           disable_bucketing=(i > 0)))
    return wrapped


def build_optimizer(ddp_chunks, optimizer_config):
    """Megatron's get_megatron_optimizer (returns a ChainedOptimizer over dense/expert groups)."""
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(optimizer_config, list(ddp_chunks))


def zero_grads(ddp_chunks, optimizer) -> None:
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
