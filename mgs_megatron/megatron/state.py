"""Canonical full (unsharded) Megatron state dicts: gather from and load into TP/PP-sharded model chunks.

Canonical form = what a TP1/PP1 model would hold: Megatron parameter names with *global* layer numbers, full
tensors, and linear_fc1 as [gate; up] (a TP shard holds [gate_r; up_r], so the concatenation of shards is not it).
The converter maps HF <-> canonical; this module only slices and gathers.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_TIED_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _global_name(model: torch.nn.Module, local_name: str) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local_name[m.end():]


def named_global_parameters(chunks: Sequence[torch.nn.Module]
                            ) -> Iterator[tuple[str, torch.nn.Parameter, torch.nn.Module]]:
    """(canonical name, local parameter, its GPTModel) for every parameter of this rank's chunks."""
    for chunk in chunks:
        model = unwrap(chunk)
        for name, p in model.named_parameters():
            yield _global_name(model, name), p, model


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_group()


def shard_for_rank(name: str, full: torch.Tensor, param: torch.Tensor, gated: bool, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's slice of a canonical full tensor."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if gated and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def full_from_shards(name: str, shards: Sequence[torch.Tensor], param: torch.Tensor, gated: bool) -> torch.Tensor:
    """Inverse of shard_for_rank."""
    if not getattr(param, "tensor_model_parallel", False) or len(shards) == 1:
        return shards[0]
    if gated and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=param.partition_dim)


@torch.no_grad()
def load_full_state_dict(chunks: Sequence[torch.nn.Module], state: dict[str, torch.Tensor],
                         strict: bool = True) -> None:
    """Copy canonical full tensors into this rank's shards (every rank passes the same dict, or a superset)."""
    tp, rank, _ = _tp()
    for name, p, model in named_global_parameters(chunks):
        key = _EMBEDDING if name == _TIED_OUTPUT and model.share_embeddings_and_output_weights else name
        if key not in state:
            if strict:
                raise KeyError(f"load_full_state_dict: tensor {key!r} missing from the state dict")
            continue
        shard = shard_for_rank(name, state[key], p, model.config.gated_linear_unit, tp, rank)
        if shard.shape != p.shape:
            raise ValueError(f"load_full_state_dict: tensor {key!r} has shape {tuple(state[key].shape)}, whose "
                             f"TP shard {tuple(shard.shape)} does not fit parameter {tuple(p.shape)}")
        p.copy_(shard)


@torch.no_grad()
def gather_full_state_dict(chunks: Sequence[torch.nn.Module], *, tensors: Iterable[str] | None = None,
                           all_ranks: bool = True) -> dict[str, torch.Tensor]:
    """Canonical full tensors of the whole model (TP all-gather, PP exchange); CPU fp32-preserving copies.

    Meant for tests and small models; the streaming exporter in convert/ avoids materialising everything.
    """
    from megatron.core import parallel_state as ps

    tp, _, group = _tp()
    wanted = set(tensors) if tensors is not None else None
    local: dict[str, torch.Tensor] = {}
    for name, p, model in named_global_parameters(chunks):
        if name == _TIED_OUTPUT and model.share_embeddings_and_output_weights:
            continue
        if wanted is not None and name not in wanted:
            continue
        data = p.detach()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(data) for _ in range(tp)]
            dist.all_gather(shards, data.contiguous(), group=group)
            data = full_from_shards(name, shards, p, model.config.gated_linear_unit)
        local[name] = data.cpu().clone()
    if ps.get_pipeline_model_parallel_world_size() > 1 and all_ranks:
        parts: list = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, local, group=ps.get_pipeline_model_parallel_group())
        local = {k: v for part in parts for k, v in part.items()}
    return local
