"""A live (TP/PP-sharded) model's weights to and from Megatron-LM torch_dist checkpoints; every rank calls.

Both directions go through Megatron's own `dist_checkpointing` with the model's own `sharded_state_dict()`, so
the keys, the stacked layer axis and the TE norm names are exactly Megatron-LM's, every rank writes and reads only
its own shards (in parallel), and any TP/PP loads what any TP/PP saved. The embedding and output layer accept any
vocabulary padding (Megatron marks them `allow_shape_mismatch`): a Megatron-LM checkpoint padded to 128 x TP loads
into our model padded to TP.

Saving is atomic: every rank writes into `<root>/.iter_<N>.tmp`, Megatron writes `metadata.json` after the data,
then rank 0 renames the directory to `iter_<N>` and only then rewrites the tracker.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.convert.io import copy_side_files
from mgs_megatron.convert.torch_dist import (
    common_state,
    finish_iteration,
    iter_name,
    megatron_lm_args,
    resolve_iteration,
)
from mgs_megatron.convert.torch_dist_io import TorchDistReader
from mgs_megatron.errors import ConversionError
from mgs_megatron.megatron.model import padded_vocab_size
from mgs_megatron.megatron.state import unwrap
from mgs_megatron.models import ModelConfig


def _sync_save_strategy():
    """Megatron's torch_dist save strategy, synchronous for real: Megatron's own 'sync' save still goes through
    its async writer, which starts a multiprocessing Manager (0.19) or forks a writer process per bucket (0.16) -
    refused inside daemonic processes and needless here. Same key translation and planner; torch DCP's
    FileSystemWriter (threads) writes."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter

    class SyncTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(flat, False),
                     storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=self.thread_count),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                              flatten_state_dict=False, can_run_decentralized_global_plan=False))

    return SyncTorchDistSave("torch_dist", 1)


def _model_state(chunks: Sequence[torch.nn.Module]) -> dict:
    """Megatron-LM's layout: {"model": ...}, or {"model0": ..., "model1": ...} with virtual pipeline stages."""
    from megatron.core import parallel_state as ps

    md = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    sds = [unwrap(c).sharded_state_dict(metadata=md) for c in chunks]
    return {"model": sds[0]} if len(sds) == 1 else {f"model{i}": sd for i, sd in enumerate(sds)}


@torch.no_grad()
def save_torch_dist(chunks: Sequence[torch.nn.Module], cfg: ModelConfig, root, iteration: int, *,
                    hf_config: Optional[dict] = None, hf_side_dir=None) -> Path:
    """Write the live model as `<root>/iter_<iteration>` + tracker (Megatron-LM / verl / slime load it; so does
    `load_torch_dist` at any layout). Returns the iteration directory."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    root = Path(root).absolute()
    rank = dist.get_rank()
    tmp = root / f".{iter_name(iteration)}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous interrupted save of the same iteration
        tmp.mkdir()
    dist.barrier()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    args = megatron_lm_args(cfg, tp=tp, pp=pp, padded_vocab_size=padded_vocab_size(cfg.vocab_size, tp),
                            iteration=iteration, hf_config=hf_config)
    common = common_state(args, iteration)
    dist_checkpointing.save({**_model_state(chunks), **common}, str(tmp), sharded_strategy=_sync_save_strategy())
    if rank == 0:
        if not (tmp / "common.pt").exists():  # megatron-core 0.19 keeps it inside the .distcp files; 0.16 reads this
            torch.save(common, tmp / "common.pt")
        if hf_side_dir is not None:
            (tmp / "hf").mkdir(exist_ok=True)
            copy_side_files(Path(hf_side_dir), tmp / "hf")
        finish_iteration(root, tmp, iteration)
    dist.barrier()
    return root / iter_name(iteration)


def _common_strategy(iter_dir: Path) -> dict:
    """megatron-core <= 0.16 reads the common state from common.pt, which 0.19's Megatron-LM no longer writes (it
    keeps it in the .distcp files): the model's weights are all sharded, so such a checkpoint loads without it."""
    import inspect

    from megatron.core import dist_checkpointing

    if (iter_dir / "common.pt").is_file() or "common_strategy" not in inspect.signature(
            dist_checkpointing.load).parameters:
        return {}
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class WeightsOnly(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return {}

    return {"common_strategy": WeightsOnly()}


def _check_keys(state: dict, iter_dir: Path) -> list:
    """This rank's tensors that the checkpoint lacks or holds at another shape (vocabulary tensors excepted); the
    `_extra_state` objects it lacks are dropped from `state` (they hold nothing without FP8)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    saved = TorchDistReader(iter_dir).metadata.state_dict_metadata
    errors = []

    def walk(d: dict):
        for k in list(d):
            v = d[k]
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, ShardedObject) and v.unique_key not in saved and "_extra_state" in v.key:
                del d[k]
            elif isinstance(v, ShardedTensor):
                if v.key not in saved:
                    errors.append(f"tensor {v.key!r} is missing")
                elif not v.allow_shape_mismatch and tuple(saved[v.key].size) != tuple(v.global_shape):
                    errors.append(f"tensor {v.key!r} has shape {tuple(saved[v.key].size)}, the model "
                                  f"{tuple(v.global_shape)}")
    walk(state)
    return errors


@torch.no_grad()
def load_torch_dist(chunks: Sequence[torch.nn.Module], path) -> tuple[int, Optional[ModelConfig]]:
    """Load a Megatron-LM torch_dist checkpoint (its root: the tracker's iteration; or an iter_* directory),
    written at any TP/PP, into this rank's chunks. Returns (iteration, the ModelConfig mgs_megatron stored or
    None). ConversionError naming the directory and the tensor when it does not fit the model."""
    from megatron.core import dist_checkpointing

    from mgs_megatron.weights.live import check_model_matches

    iter_dir = resolve_iteration(path)
    cfg = TorchDistReader(iter_dir).model_config()
    if cfg is not None:
        check_model_matches(chunks, cfg)
    state = _model_state(chunks)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, _check_keys(state, iter_dir))  # every rank fails together, none hangs
    bad = sorted({e for errs in errors for e in errs})
    if bad:
        raise ConversionError(f"checkpoint {str(iter_dir)!r} does not fit the model: {'; '.join(bad[:4])}"
                              + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))
    loaded = dist_checkpointing.load(state, str(iter_dir), **_common_strategy(iter_dir))
    for i, chunk in enumerate(chunks):
        sd = loaded["model" if len(chunks) == 1 else f"model{i}"]
        missing = [k for k in unwrap(chunk).load_state_dict(sd, strict=False).missing_keys
                   if not k.endswith("_extra_state")]
        if missing:
            raise ConversionError(f"checkpoint {str(iter_dir)!r} left parameter(s) {missing[:4]} unset")
    return int(TorchDistReader(iter_dir).common().get("iteration", 0)), cfg


__all__ = ["load_torch_dist", "save_torch_dist"]
