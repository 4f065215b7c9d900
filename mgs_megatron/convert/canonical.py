"""The canonical Megatron checkpoint format ("mgs-canonical-v1") and file-to-file conversion with HF directories.

    <dir>/mgs_checkpoint.json           format, ModelConfig, the source HF config, tensor naming conventions
                                        (written last: its presence marks a complete checkpoint)
    <dir>/model-0000i-of-0000N.safetensors + model.safetensors.index.json
                                        canonical full tensors (global layer numbers, LOCAL-spec norm names,
                                        fc1 = [gate; up], qkv interleaved per query group, UNPADDED vocab)
    <dir>/hf/                           config.json, tokenizer and generation files of the source model

Why full tensors rather than Megatron's dist_checkpointing: the file is independent of TP/PP (any layout loads
it: each rank reads, mmap-backed, only its own tensors), conversion needs no model and no process group, and
safetensors shards are what HF tooling reads. Loading into / saving from a live model is `mgs_megatron.weights`.
All writes go to a temp dir beside the target, renamed at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from mgs_megatron.convert.io import SafetensorsDir, atomic_dir, copy_side_files, read_config, write_sharded
from mgs_megatron.errors import ConversionError
from mgs_megatron.models import ModelConfig, model_config_from_hf, tensor_maps
from mgs_megatron.models.mapping import check_hf_names, check_mcore_names, hf_to_mcore, mcore_to_hf

FORMAT = "mgs-canonical-v1"
META = "mgs_checkpoint.json"
DEFAULT_SHARD_BYTES = 2 << 30


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def is_canonical(path) -> bool:
    return (Path(path) / META).is_file()


def read_metadata(path) -> dict:
    meta = Path(path) / META
    if not meta.is_file():
        raise ConversionError(f"{str(path)!r} is not a converted Megatron checkpoint ({META} missing)")
    data = json.loads(meta.read_text())
    if data.get("format") != FORMAT:
        raise ConversionError(f"{str(meta)!r}: format={data.get('format')!r}, expected {FORMAT!r}")
    return data


def read_model_config(path) -> ModelConfig:
    return ModelConfig.from_dict(read_metadata(path)["model_config"])


def write_canonical(dst: Path, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                    hf_config: Optional[dict], hf_side_dir=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write canonical (name, full tensor) pairs, the HF side files and the metadata (last) into `dst`."""
    write_sharded(dst, tensors, max_shard_bytes, metadata={"format": FORMAT})
    (dst / "hf").mkdir()
    if hf_side_dir is not None:
        copy_side_files(Path(hf_side_dir), dst / "hf")
    meta = {"format": FORMAT, "model_config": cfg.to_dict(), "hf_config": hf_config, "norm_names": "local",
            "vocab": "unpadded", "fc1": "gate;up", "qkv": "per-query-group [q..., k, v]"}
    (dst / META).write_text(json.dumps(meta, indent=2))


def open_hf(hf_dir) -> tuple[dict, ModelConfig, SafetensorsDir]:
    """(config.json, its ModelConfig, the safetensors) of an HF model directory whose tensor names fit the
    architecture (ConversionError naming the missing / unexpected ones)."""
    hf_config = read_config(Path(hf_dir))
    cfg = model_config_from_hf(hf_config)
    src = SafetensorsDir(Path(hf_dir))
    check_hf_names(src.keys(), cfg)
    return hf_config, cfg, src


def hf_to_mcore_checkpoint(hf_dir, out_dir, *, overwrite: bool = False, progress: bool = True,
                           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ModelConfig:
    """HF model directory -> canonical Megatron checkpoint (no model is built; one tensor group at a time)."""
    hf_dir = Path(hf_dir)
    hf_config, cfg, src = open_hf(hf_dir)
    with atomic_dir(out_dir, overwrite) as tmp, progress_bar(src.nbytes(), "hf->mcore", progress) as bar:
        def tensors():
            for tm in tensor_maps(cfg):
                t = hf_to_mcore(tm, src.get, cfg)
                bar.update(t.numel() * t.element_size())
                yield tm.mcore, t
        write_canonical(tmp, cfg, tensors(), hf_config=hf_config, hf_side_dir=hf_dir, max_shard_bytes=max_shard_bytes)
    return cfg


def mcore_to_hf_checkpoint(mcore_dir, out_dir, *, overwrite: bool = False, progress: bool = True,
                           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ModelConfig:
    """Canonical Megatron checkpoint -> HF directory (safetensors shards + index, config and tokenizer files)."""
    mcore_dir = Path(mcore_dir)
    meta = read_metadata(mcore_dir)
    cfg = ModelConfig.from_dict(meta["model_config"])
    src = SafetensorsDir(mcore_dir)
    check_mcore_names(src.keys(), cfg)
    with atomic_dir(out_dir, overwrite) as tmp, progress_bar(src.nbytes(), "mcore->hf", progress) as bar:
        def tensors():
            for tm in tensor_maps(cfg):
                full = src.get(tm.mcore)
                bar.update(full.numel() * full.element_size())
                yield from mcore_to_hf(tm, full, cfg)
        write_sharded(tmp, tensors(), max_shard_bytes)
        if (mcore_dir / "hf").is_dir():
            copy_side_files(mcore_dir / "hf", tmp)
        if not (tmp / "config.json").exists():
            if meta.get("hf_config") is None:
                raise ConversionError(f"{str(mcore_dir)!r} has no HF config to write config.json from")
            (tmp / "config.json").write_text(json.dumps(meta["hf_config"], indent=2))
    return cfg


__all__ = ["DEFAULT_SHARD_BYTES", "FORMAT", "META", "hf_to_mcore_checkpoint", "is_canonical", "mcore_to_hf_checkpoint",
           "read_metadata", "read_model_config", "write_canonical"]
