"""Reading and writing torch_dist iteration directories in one plain process (torch.distributed.checkpoint only,
no process group, no Megatron): the key layout and directories are torch_dist.py's.

The reader reads one layer of a stacked tensor at a time (memory: one layer); the writer produces each chunk
lazily when DCP writes it (memory: one chunk), into a temp directory renamed into place before the tracker moves.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from mgs_megatron.convert.torch_dist import (
    COMMON_KEY,
    DONE,
    EXTRA_STATE_MODULES,
    finish_iteration,
    iter_name,
    key_of,
    resolve_iteration,
)
from mgs_megatron.devices import HOST
from mgs_megatron.errors import ConversionError
from mgs_megatron.models import ModelConfig


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


__all__ = ["Chunk", "TorchDistReader", "write_iteration"]
