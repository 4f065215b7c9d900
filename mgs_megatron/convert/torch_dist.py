"""Megatron-LM's torch_dist checkpoints, file level and single-process (torch.distributed.checkpoint only, no
process group, no Megatron): the directory layout, the key layout, a reader and a writer.

    <root>/latest_checkpointed_iteration.txt      "<N>" (or "release"): the tracker, written LAST
    <root>/iter_<N:07d>/.metadata                 torch DCP metadata: every key, its global shape and chunks
    <root>/iter_<N:07d>/__<rank>_<i>.distcp       the data
    <root>/iter_<N:07d>/metadata.json             {"sharded_backend": "torch_dist", ...}: marks a complete save
    <root>/iter_<N:07d>/common.pt                 the common state on megatron-core <= 0.16 (0.19 keeps it in the
                                                  .distcp files as the object `common_state`); we write both

Keys (Megatron-LM's, the same for the local and the Transformer-Engine layer specs): the layers' tensors are
STACKED along a leading layer axis, `decoder.layers.self_attention.linear_qkv.weight` [L, rows, hidden]; norms
use the TE names (`...linear_qkv.layer_norm_weight`, `...linear_fc1.layer_norm_weight`); the vocabulary rows are
padded (Megatron-LM: to a multiple of make_vocab_size_divisible_by x TP; Megatron's loaders accept any padding for
the embedding and output layer). The common state holds `args` (an argparse.Namespace), `iteration` and
`checkpoint_version`.

The reader reads one layer of a stacked tensor at a time (memory: one layer); the writer produces each chunk
lazily when DCP writes it (memory: one chunk), into a temp directory that is renamed into place; the tracker is
written after the rename, so a half-written `iter_*` directory is never the one a loader picks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch

from mgs_megatron.devices import HOST
from mgs_megatron.errors import ConversionError
from mgs_megatron.models import ModelConfig
from mgs_megatron.models.tensor_map import te_name

TRACKER = "latest_checkpointed_iteration.txt"
DONE = "metadata.json"  # Megatron writes it after the data (and we rename the directory after that)
COMMON_KEY = "common_state/shard_0_1"
CHECKPOINT_VERSION = 3.0
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Megatron's linear layers carry an `_extra_state` object per layer (None without FP8); the TE spec adds one for
# core attention. Written as None so that loaders of either spec find what they ask for.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                       "mlp.linear_fc2", "self_attention.core_attention")


def iter_name(iteration: Union[int, str]) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


# ------------------------------------------------------------------------------------------------ directories
def is_torch_dist(path) -> bool:
    """A Megatron-LM checkpoint root (has the tracker) or one of its `iter_*` directories."""
    path = Path(path)
    return (path / TRACKER).is_file() or _backend(path) is not None


def _backend(iter_dir: Path) -> Optional[str]:
    f = iter_dir / DONE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("sharded_backend")
    except (ValueError, AttributeError):
        return None


def resolve_iteration(path) -> Path:
    """The complete `iter_*` directory a loader should read: the one the tracker names, or `path` itself.

    ConversionError (naming the directory) when it is missing, half-written (no metadata.json: an interrupted
    save) or in another format than torch_dist."""
    path = Path(path)
    if (path / TRACKER).is_file():
        value = (path / TRACKER).read_text().strip()
        if value != "release" and not value.isdigit():
            raise ConversionError(f"{str(path / TRACKER)!r} holds {value!r}, not an iteration number")
        path = path / iter_name(value if value == "release" else int(value))
    if not path.is_dir():
        raise ConversionError(f"Megatron-LM checkpoint directory {str(path)!r} does not exist (the tracker names it)")
    backend = _backend(path)
    if backend is None:
        legacy = next(path.glob("mp_rank_*"), None)
        why = ("it is in the legacy per-rank torch format (mp_rank_*/), not torch_dist" if legacy else
               f"it has no {DONE}: the save that wrote it did not finish")
        raise ConversionError(f"checkpoint {str(path)!r} cannot be loaded: {why}")
    if backend != "torch_dist":
        raise ConversionError(f"checkpoint {str(path)!r} uses sharded_backend={backend!r}; only torch_dist is read")
    return path


def write_tracker(root: Path, iteration: Union[int, str]) -> None:
    part = root / f".{TRACKER}.part"
    part.write_text(str(iteration))
    os.replace(part, root / TRACKER)


def finish_iteration(root: Path, tmp: Path, iteration: int) -> Path:
    """Rename a completely written temp directory to `iter_<N>` (replacing an older one atomically), then point
    the tracker at it. A crash before the rename leaves the previous tracker and directories untouched."""
    final = root / iter_name(iteration)
    if final.exists():  # move the old one aside first, so that a crash never leaves neither
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=root))
        os.replace(final, old / "x")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    write_tracker(root, iteration)
    return final


# ------------------------------------------------------------------------------------------------ key layout
@dataclass(frozen=True)
class Key:
    """Where a canonical tensor lives in a torch_dist checkpoint: its key and, for layer tensors, its index along
    the stacked layer axis."""

    key: str
    layer: Optional[int] = None


def key_of(canonical: str) -> Key:
    """`decoder.layers.3.input_layernorm.weight` -> Key('decoder.layers.self_attention.linear_qkv.layer_norm_weight',
    3); non-layer tensors keep their names."""
    m = _LAYER.match(te_name(canonical))
    if not m:
        return Key(canonical)
    return Key(f"decoder.layers.{m.group(2)}", int(m.group(1)))


def padded_vocab(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron-LM's rule (megatron/training/vocab_utils.py): a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def megatron_lm_args(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, padded_vocab_size: int, iteration: int,
                     hf_config: Optional[dict] = None, **extra) -> argparse.Namespace:
    """The `args` a Megatron-LM checkpoint carries: what `load_checkpoint` checks (num_layers, hidden_size,
    num_attention_heads, add_position_embedding), what tells it there is no RNG or optimizer state to load, the
    model's shape in Megatron-LM's argument names, and ours (`mgs_model_config`, `mgs_hf_config`) for conversion."""
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        group_query_attention=cfg.num_key_value_heads != cfg.num_attention_heads, kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, position_embedding_type="rope",
        add_position_embedding=False, rotary_base=cfg.rope_theta, use_rope_scaling=cfg.rope_scaling is not None,
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, swiglu=True, add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias, qk_layernorm=cfg.qk_norm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings, padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        ckpt_format="torch_dist", use_dist_ckpt=True, no_save_rng=True, no_save_optim=True, iteration=iteration,
        consumed_train_samples=0, consumed_valid_samples=0, mgs_model_config=cfg.to_dict(), mgs_hf_config=hf_config,
        **extra)


def common_state(args: argparse.Namespace, iteration: int) -> dict:
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            "num_floating_point_operations_so_far": 0}


# ------------------------------------------------------------------------------------------------ reading
@contextlib.contextmanager
def _single_process():
    """torch DCP warns at every call that it runs without a process group: here that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    return dcp, FileSystemReader, DefaultLoadPlanner


def _read_planner(requests: dict[str, tuple[tuple[int, ...], Any]]):
    """A DCP load planner that fills `requests` {key: (offsets, destination tensor | None for a bytes object)}:
    only the overlapping parts of the saved chunks are read (one layer of a stacked tensor, not all of them)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    _, _, DefaultLoadPlanner = _dcp()

    class SlicePlanner(DefaultLoadPlanner):
        def create_local_plan(self):
            items = []
            for key, (offsets, dest) in requests.items():
                md = self.metadata.state_dict_metadata[key]
                if dest is None:
                    from torch.distributed.checkpoint.planner import LoadItemType

                    items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(key),
                                          dest_offsets=torch.Size((0,)), storage_index=MetadataIndex(key),
                                          storage_offsets=torch.Size((0,)), lengths=torch.Size((0,))))
                    continue
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
                items += create_read_items_for_chunk_list(key, md, [chunk])
            return LoadPlan(items)

        def load_bytes(self, read_item, value):
            self.loaded[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

        def resolve_tensor(self, read_item):
            dest = requests[read_item.dest_index.fqn][1]
            for dim, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, off, n)
            return dest

    planner = SlicePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    planner.loaded = {}
    return planner


class TorchDistReader:
    """Read-only view of one complete torch_dist iteration directory (see `resolve_iteration`)."""

    def __init__(self, path):
        dcp, FileSystemReader, _ = _dcp()
        self.path = resolve_iteration(path)
        self._fs = FileSystemReader(str(self.path))
        self.metadata = self._fs.read_metadata()
        self._common: Optional[dict] = None

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def __contains__(self, key: str) -> bool:
        return key in self.metadata.state_dict_metadata

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor_md(key).size)

    def _tensor_md(self, key: str):
        md = self.metadata.state_dict_metadata.get(key)
        if md is None or not hasattr(md, "size"):
            raise ConversionError(f"tensor {key!r} not found in torch_dist checkpoint {str(self.path)!r}")
        return md

    def _load(self, requests: dict) -> dict:
        dcp, _, _ = _dcp()
        planner = _read_planner(requests)
        with _single_process():
            dcp.load({}, storage_reader=self._fs, planner=planner, no_dist=True)
        return planner.loaded

    def get(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The full tensor, or layer `layer` of a stacked one (read alone)."""
        md = self._tensor_md(key)
        size = list(md.size)
        offsets = [0] * len(size)
        if layer is not None:
            if not 0 <= layer < size[0]:
                raise ConversionError(f"{key!r} in {str(self.path)!r} has {size[0]} layers, layer {layer} asked")
            offsets[0], size[0] = layer, 1
        dest = torch.empty(size, dtype=md.properties.dtype, device=HOST)
        self._load({key: (tuple(offsets), dest)})
        return dest[0] if layer is not None else dest

    def common(self) -> dict:
        """The common state (args, iteration, checkpoint_version): common.pt (megatron-core <= 0.16) or the
        `common_state` object (0.19)."""
        if self._common is None:
            if (self.path / "common.pt").is_file():
                self._common = torch.load(self.path / "common.pt", map_location="cpu", weights_only=False)
            elif COMMON_KEY in self:
                self._common = self._load({COMMON_KEY: ((0,), None)})[COMMON_KEY][0]
            else:
                self._common = {}
        return self._common

    def args(self) -> Optional[argparse.Namespace]:
        return self.common().get("args")

    def model_config(self) -> Optional[ModelConfig]:
        """The ModelConfig we stored (checkpoints written by mgs_megatron), else None."""
        d = getattr(self.args(), "mgs_model_config", None)
        return ModelConfig.from_dict(d) if d else None

    def get_canonical(self, canonical: str) -> torch.Tensor:
        k = key_of(canonical)
        return self.get(k.key, k.layer)


# ------------------------------------------------------------------------------------------------ writing
@dataclass
class Chunk:
    """One chunk of a global tensor: made by `make()` only when DCP writes it."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def _write_planner(chunks: list[Chunk], objects: dict[str, Any]):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner, create_default_global_save_plan
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    by_index = {}
    items = []
    for c in chunks:
        index = MetadataIndex(c.key, torch.Size(c.offsets))
        by_index[(c.key, tuple(c.offsets))] = c
        items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
            properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape))))
    items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in objects]

    class ChunkPlanner(DefaultSavePlanner):
        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
            self.state_dict, self.is_coordinator = {}, is_coordinator

        def create_local_plan(self):
            self.plan = SavePlan(items)
            return self.plan

        def create_global_plan(self, all_plans):
            plans, self.metadata = create_default_global_save_plan(all_plans)
            return plans, self.metadata

        def finish_plan(self, new_plan):
            self.plan = new_plan
            return new_plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(objects[write_item.index.fqn], buf)  # Megatron's reader torch.load()s the list back
                return buf
            c = by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
            t = c.make()
            if tuple(t.shape) != tuple(c.sizes) or t.dtype != c.dtype:
                raise ConversionError(f"chunk of {c.key!r} at {c.offsets}: made {tuple(t.shape)} {t.dtype}, "
                                      f"declared {tuple(c.sizes)} {c.dtype}")
            return t.contiguous()

    return ChunkPlanner()


def write_iteration(root, iteration: int, chunks: Iterable[Chunk], common: dict, *, extra_state_layers: int = 0,
                    side_files: Optional[Callable[[Path], None]] = None, overwrite: bool = True) -> Path:
    """Write one complete iteration directory from `chunks` (single process), then the tracker; returns it.

    `extra_state_layers`: write the per-layer `_extra_state` objects (None) of EXTRA_STATE_MODULES for that many
    layers. Megatron's `.metadata`, then `common.pt`, `metadata.json`, the rename and the tracker come in that
    order; anything that fails before the rename leaves only a temp directory that nothing reads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    objects: dict[str, Any] = {COMMON_KEY: [common]}
    for m in EXTRA_STATE_MODULES:
        for i in range(extra_state_layers):
            objects[f"decoder.layers.{m}._extra_state/shard_{i}_{extra_state_layers}"] = [None]
    final = root / iter_name(iteration)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{str(final)!r} already exists (pass overwrite=True / --overwrite)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        with _single_process():
            dcp.save({}, storage_writer=FileSystemWriter(str(tmp), thread_count=1), planner=_write_planner(
                list(chunks), objects), no_dist=True)
        torch.save(common, tmp / "common.pt")
        if side_files is not None:
            side_files(tmp)
        (tmp / DONE).write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
        finish_iteration(root, tmp, iteration)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


__all__ = ["CHECKPOINT_VERSION", "COMMON_KEY", "Chunk", "DONE", "EXTRA_STATE_MODULES", "Key", "TRACKER",
           "TorchDistReader", "common_state", "finish_iteration", "is_torch_dist", "iter_name", "key_of",
           "megatron_lm_args", "padded_vocab", "resolve_iteration", "write_iteration", "write_tracker"]
