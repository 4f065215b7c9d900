"""Streaming export from a live TP/PP-sharded Megatron model: canonical full tensors, or HF-named groups.

Every rank of the job must iterate the generator to the end (it runs TP all-gathers and PP transfers). Which
ranks *receive* the tensors:
  * all_ranks=True (default): every rank (each DP replica gathers inside its own TP/PP groups; PP stages get the
    tensors by broadcast over the pipeline group);
  * all_ranks=False: only global rank 0 (DP replicas other than 0 do nothing; a non-first stage's TP-rank 0 sends
    to rank 0 point-to-point). Other ranks get empty groups.
Groups have the same boundaries on every rank (sizes come from a metadata table exchanged once).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.devices import collective_device
from mgs_megatron.errors import ConversionError
from mgs_megatron.megatron.state import full_from_shards, named_global_parameters
from mgs_megatron.models import ModelConfig, TensorMap, hf_shapes, tensor_maps
from mgs_megatron.models.mapping import mcore_to_hf
from mgs_megatron.models.tensor_map import local_name

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def _groups():
    from megatron.core import parallel_state as ps

    return ps


def _local_params(chunks) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Module]]:
    out = {}
    for name, p, model in named_global_parameters(chunks):
        name = local_name(name)
        if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            continue  # tied: the embedding is the one copy (the last stage's output_layer is a synced replica)
        out[name] = (p, model)
    return out


def _full_shape(p: torch.Tensor, tp: int) -> tuple[int, ...]:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return tuple(shape)


def _owner_table(local: dict, tp: int) -> dict[str, tuple[int, tuple[int, ...], str]]:
    """name -> (owning pipeline rank, full shape, dtype) for the whole model, the same on every rank."""
    ps = _groups()
    mine = {n: (_full_shape(p, tp), str(p.dtype)) for n, (p, _) in local.items()}
    parts: list = [None] * ps.get_pipeline_model_parallel_world_size()
    if len(parts) == 1:
        parts = [mine]
    else:
        dist.all_gather_object(parts, mine, group=ps.get_pipeline_model_parallel_group())
    return {n: (stage, shape, dt) for stage, part in enumerate(parts) for n, (shape, dt) in part.items()}


def _tp_gather(name: str, p: torch.Tensor, model) -> torch.Tensor:
    ps = _groups()
    tp = ps.get_tensor_model_parallel_world_size()
    data = p.detach()
    if not getattr(p, "tensor_model_parallel", False) or tp == 1:
        return data.clone()
    shards = [torch.empty_like(data) for _ in range(tp)]
    dist.all_gather(shards, data.contiguous(), group=ps.get_tensor_model_parallel_group())
    return full_from_shards(name, shards, p, model.config.gated_linear_unit)


@torch.no_grad()
def iter_canonical(chunks: Sequence[torch.nn.Module], cfg: ModelConfig, *, all_ranks: bool = True
                   ) -> Iterator[tuple[TensorMap, Optional[torch.Tensor]]]:
    """(TensorMap, full canonical tensor or None on non-receiving ranks), in model order, one tensor at a time."""
    ps = _groups()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    stage, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    local = _local_params(chunks)
    owners = _owner_table(local, tp)
    maps = tensor_maps(cfg)
    missing = [tm.mcore for tm in maps if tm.mcore not in owners]
    if missing:
        raise ConversionError(f"live model has no parameter(s) {missing[:8]} expected for {cfg.architecture!r}")
    skip = not all_ranks and ps.get_data_parallel_rank() != 0
    pp_group = ps.get_pipeline_model_parallel_group() if pp > 1 else None
    for tm in maps:
        if skip:
            yield tm, None
            continue
        owner, shape, dtype = owners[tm.mcore]
        full = _tp_gather(tm.mcore, *local[tm.mcore]) if stage == owner else None
        if pp > 1 and all_ranks:
            if full is None:
                full = torch.empty(shape, dtype=_DTYPES[dtype], device=collective_device(pp_group))
            dist.broadcast(full, src=dist.get_global_rank(pp_group, owner), group=pp_group)
        elif pp > 1 and owner != 0 and tp_rank == 0:
            first = dist.get_global_rank(pp_group, 0)
            if stage == owner:
                dist.send(full.contiguous(), dst=first)
                full = None
            elif stage == 0:
                full = torch.empty(shape, dtype=_DTYPES[dtype], device=collective_device(pp_group))
                dist.recv(full, src=dist.get_global_rank(pp_group, owner))
        if not all_ranks and dist.get_rank() != 0:
            full = None
        yield tm, full


def iter_hf_weights(chunks: Sequence[torch.nn.Module], cfg: ModelConfig, *, max_bytes: int = 1 << 30,
                    all_ranks: bool = True, dtype: Optional[torch.dtype] = None
                    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups of (HF name, full tensor) of at most ~max_bytes each; fused groups (q,k,v / gate,up) stay whole,
    and so do HF modules (a q_proj weight and its bias): vLLM leaves a module half-loaded when one reload call
    carries only part of its tensors.

    A single canonical tensor larger than max_bytes forms a group of its own. Vocab padding is stripped.
    On non-receiving ranks (see module doc) the groups are empty lists, yielded at the same points.
    """
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    last_modules: set[str] = set()
    for tm, full in iter_canonical(chunks, cfg, all_ranks=all_ranks):
        pieces = mcore_to_hf(tm, full, cfg) if full is not None else []
        if dtype is not None:
            pieces = [(n, t.to(dtype)) for n, t in pieces]
        nbytes = _nbytes_of(tm, cfg, dtype)
        modules = {n.rsplit(".", 1)[0] for n in tm.hf}
        if size and size + nbytes > max_bytes and not (modules & last_modules):
            yield group
            group, size = [], 0
        group += pieces
        size += nbytes
        last_modules = modules
    if size:
        yield group


def _nbytes_of(tm: TensorMap, cfg: ModelConfig, dtype: Optional[torch.dtype]) -> int:
    """Bytes of a TensorMap's HF tensors, computable on every rank (so group boundaries agree)."""
    shapes = hf_shapes(cfg)
    elem = (dtype or torch.float32).itemsize
    return sum(int(torch.Size(shapes[n]).numel()) for n in tm.hf) * elem
