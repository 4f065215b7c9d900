"""Prompt distribution and result gathering across ranks.

Every rank passes the SAME global prompt list (e.g. the step's batch from the sampler). Generation is split
over the rollout-DP engines (each rank holds one engine on CPU: rollout DP = world / rollout_tp; the ranks of one
rollout-TP group get the same shard); results are all-gathered as Python objects, and each rank keeps the prompts
of its *Megatron* DP rank (contiguous slices, all n samples of a prompt together; TP/PP peers get identical
lists). all_gather_object is O(world x rollouts) of token lists: fine for RL batch sizes; a targeted all_to_all
would replace it at large scale.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.distributed as dist

from mgs_megatron.rollout.config import Rollout


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part `index` when n items are split into `parts` contiguous near-equal parts."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _megatron_dp() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return 0, 1


def generate_distributed(engine, prompts: Sequence, *, step: int = 0,
                         dp: Optional[tuple[int, int]] = None, **sampling_overrides) -> list[Rollout]:
    """This rank's training rollouts for a global prompt list (call on every rank together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return engine.generate(prompts, step=step, **sampling_overrides)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = engine.cfg.rollout_tp
    lo, hi = split_range(len(prompts), world // tp, rank // tp)
    mine = engine.generate(prompts[lo:hi], step=step, prompt_offset=lo, **sampling_overrides)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine if rank % tp == 0 else [])
    everything = sorted((r for part in gathered for r in part), key=lambda r: (r.prompt_index, r.sample_index))
    dp_rank, dp_size = dp or _megatron_dp()
    lo, hi = split_range(len(prompts), dp_size, dp_rank)
    return [r for r in everything if lo <= r.prompt_index < hi]
