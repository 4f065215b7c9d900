"""Wrap model chunks in Megatron DDP and build Megatron's optimizer (explicit dataclass configs, Megatron's own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class OptimConfig:
    """Adam through Megatron's optimizer (distributed or not), gradient clipping, and the micro-batch size."""

    lr: float = 1e-6
    """Learning rate (constant)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    decay_all_params: bool = False
    """Apply weight decay to every parameter, norms and biases included (the official MGS code: one AdamW group);
    false: Megatron's default, which exempts biases and 1-D parameters."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (after the surgery)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    micro_batch_size: int = 4
    """Sequences per forward/backward micro-batch (every micro-batch holds one domain)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state and gradients over data-parallel ranks (MGS then stashes only this rank's shard)."""

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.lr < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError(f"lr={self.lr}, weight_decay={self.weight_decay}, clip_grad={self.clip_grad} must be >= 0")


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


def build_optimizer(ddp_chunks, optimizer_config, *, decay_all_params: bool = False):
    """Megatron's get_megatron_optimizer (returns a ChainedOptimizer over dense/expert groups). decay_all_params:
    no per-parameter overrides, so no parameter is exempt from weight decay."""
    from megatron.core.optimizer import get_megatron_optimizer

    optimizer = get_megatron_optimizer(optimizer_config, list(ddp_chunks),
                                       config_overrides={} if decay_all_params else None)
    # Megatron applies a group's wd_mult (0 for biases and norms) only through its OptimizerParamScheduler, which we
    # do not use (constant lr): apply it here, else every parameter would be decayed whatever the setting.
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            group["weight_decay"] = optimizer_config.weight_decay * group.get("wd_mult", 1.0)
    return optimizer


def make_trainable(chunks: Sequence[torch.nn.Module], cfg: OptimConfig, *, params_dtype: torch.dtype, device: str,
                   lr: float | None = None, weight_decay: float | None = None):
    """DDP-wrapped chunks and Megatron's Adam for `cfg` (fp32 grad reduction; bf16 params keep fp32 main params),
    with Megatron's schedules driving the gradient sync. Returns (ddp_chunks, optimizer)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from mgs_megatron.megatron.schedule import configure_grad_sync

    ddp = wrap_ddp(chunks, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer), device=device)
    optimizer = build_optimizer(ddp, OptimizerConfig(
        optimizer="adam", lr=cfg.lr if lr is None else lr,
        weight_decay=cfg.weight_decay if weight_decay is None else weight_decay, clip_grad=cfg.clip_grad,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, use_distributed_optimizer=cfg.use_distributed_optimizer,
        bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype), decay_all_params=cfg.decay_all_params)
    configure_grad_sync(ddp)
    return ddp, optimizer


def zero_grads(ddp_chunks, optimizer) -> None:
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
