"""Checkpoint files: HF dir <-> "mgs canonical" Megatron checkpoint dir, and loading either into a live model.

Megatron checkpoint format ("mgs-canonical-v1"; why not dist_checkpointing: see docs/benchmarks_convert.md and
the module README in convert/__init__.py):
  <dir>/mgs_checkpoint.json           format, ModelConfig, the source HF config, tensor naming conventions
  <dir>/model-0000i-of-0000N.safetensors + model.safetensors.index.json
                                      canonical full tensors (global layer numbers, LOCAL-spec norm names,
                                      fc1 = [gate; up], qkv interleaved per query group, UNPADDED vocab)
  <dir>/hf/                           config.json, tokenizer and generation files of the source model
Any TP/PP loads it: each rank reads (mmap) only the tensors of its own chunks, pads the vocab for its TP size
and slices its shard. All writes go to a temp dir beside the target, renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.megatron.model import ConfigError, ModelConfig, RopeScaling
from mgs_megatron.megatron.state import load_full_state_dict, named_global_parameters
from mgs_megatron.convert.base import VOCAB, local_name, tensor_maps
from mgs_megatron.convert.io import SafetensorsDir, atomic_dir, copy_side_files, read_config, write_sharded
from mgs_megatron.convert.mapping import (ConversionError, check_hf_names, check_mcore_names, hf_to_mcore,
                                          mcore_to_hf, pad_vocab)
from mgs_megatron.convert.registry import model_config_from_hf
from mgs_megatron.convert.stream import iter_canonical, iter_hf_weights

FORMAT = "mgs-canonical-v1"
META = "mgs_checkpoint.json"
DEFAULT_SHARD_BYTES = 2 << 30


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelConfig(**d)


def read_metadata(path) -> dict:
    meta = Path(path) / META
    if not meta.is_file():
        raise ConversionError(f"{str(path)!r} is not a converted Megatron checkpoint ({META} missing)")
    data = json.loads(meta.read_text())
    if data.get("format") != FORMAT:
        raise ConversionError(f"{str(meta)!r}: format={data.get('format')!r}, expected {FORMAT!r}")
    return data


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------- file <-> file
def hf_to_mcore_checkpoint(hf_dir, out_dir, *, overwrite: bool = False, progress: bool = True,
                           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ModelConfig:
    """HF model directory -> canonical Megatron checkpoint (no model is built; one tensor group at a time)."""
    hf_dir = Path(hf_dir)
    hf_config = read_config(hf_dir)
    cfg = model_config_from_hf(hf_config)
    src = SafetensorsDir(hf_dir)
    check_hf_names(src.keys(), cfg)
    with atomic_dir(out_dir, overwrite) as tmp, _progress(src.nbytes(), "hf->mcore", progress) as bar:
        def tensors():
            for tm in tensor_maps(cfg):
                t = hf_to_mcore(tm, src.get, cfg)
                bar.update(_nbytes(t))
                yield tm.mcore, t
        write_sharded(tmp, tensors(), max_shard_bytes, metadata={"format": FORMAT})
        (tmp / "hf").mkdir()
        copy_side_files(hf_dir, tmp / "hf")
        _write_meta(tmp, cfg, hf_config)
    return cfg


def _write_meta(dst: Path, cfg: ModelConfig, hf_config: Optional[dict]) -> None:
    meta = {"format": FORMAT, "model_config": model_config_to_dict(cfg), "hf_config": hf_config,
            "norm_names": "local", "vocab": "unpadded", "fc1": "gate;up", "qkv": "per-query-group [q..., k, v]"}
    (dst / META).write_text(json.dumps(meta, indent=2))


def mcore_to_hf_checkpoint(mcore_dir, out_dir, *, overwrite: bool = False, progress: bool = True,
                           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ModelConfig:
    """Canonical Megatron checkpoint -> HF directory (safetensors shards + index, config and tokenizer files)."""
    mcore_dir = Path(mcore_dir)
    meta = read_metadata(mcore_dir)
    cfg = model_config_from_dict(meta["model_config"])
    src = SafetensorsDir(mcore_dir)
    check_mcore_names(src.keys(), cfg)
    with atomic_dir(out_dir, overwrite) as tmp, _progress(src.nbytes(), "mcore->hf", progress) as bar:
        def tensors():
            for tm in tensor_maps(cfg):
                full = src.get(tm.mcore)
                bar.update(_nbytes(full))
                yield from mcore_to_hf(tm, full, cfg)
        write_sharded(tmp, tensors(), max_shard_bytes)
        if (mcore_dir / "hf").is_dir():
            copy_side_files(mcore_dir / "hf", tmp)
        if not (tmp / "config.json").exists():
            if meta.get("hf_config") is None:
                raise ConversionError(f"{str(mcore_dir)!r} has no HF config to write config.json from")
            (tmp / "config.json").write_text(json.dumps(meta["hf_config"], indent=2))
    return cfg


# ---------------------------------------------------------------------------------------- live model <-> file
def _check_model_matches(chunks, cfg: ModelConfig) -> None:
    model = chunks[0].module if hasattr(chunks[0], "module") and not hasattr(chunks[0], "decoder") else chunks[0]
    tc = model.config
    got = dict(num_layers=tc.num_layers, hidden_size=tc.hidden_size, num_attention_heads=tc.num_attention_heads,
               num_query_groups=tc.num_query_groups, kv_channels=tc.kv_channels, ffn_hidden_size=tc.ffn_hidden_size)
    want = dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.head_dim,
                ffn_hidden_size=cfg.intermediate_size)
    for k in want:
        if got[k] != want[k]:
            raise ConfigError(f"checkpoint has {k}={want[k]} but the model was built with {k}={got[k]}")


@torch.no_grad()
def load_checkpoint(chunks: Sequence[torch.nn.Module], path) -> ModelConfig:
    """Load a canonical checkpoint (from any TP/PP) into this rank's model chunks; every rank calls it.

    Reads only this rank's tensors; pads the vocab to the model's (TP-padded) size; accepts local or TE norms.
    """
    path = Path(path)
    cfg = model_config_from_dict(read_metadata(path)["model_config"])
    _check_model_matches(chunks, cfg)
    src = SafetensorsDir(path)
    state = {}
    for name, p, model in named_global_parameters(chunks):
        key = local_name(name)
        if key == "output_layer.weight" and model.share_embeddings_and_output_weights:
            key, name = "embedding.word_embeddings.weight", "embedding.word_embeddings.weight"
        if key not in src:
            raise ConversionError(f"tensor {key!r} (parameter {name!r}) missing from checkpoint {str(path)!r}")
        t = src.get(key)
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            tp_full = p.shape[0] * (model.config.tensor_model_parallel_size if p.tensor_model_parallel else 1)
            t = pad_vocab(t, tp_full)
        state[name] = t.to(p.dtype)
    load_full_state_dict(chunks, state)
    return cfg


def save_checkpoint(chunks: Sequence[torch.nn.Module], cfg: ModelConfig, path, *, hf_config: Optional[dict] = None,
                    hf_side_dir=None, overwrite: bool = False, progress: bool = True,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a live model (any TP/PP) as a canonical checkpoint; every rank calls it, global rank 0 writes."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    stream = iter_canonical(chunks, cfg, all_ranks=False)
    if not rank0:
        for _ in stream:  # take part in the gathers
            pass
        dist.barrier()
        return
    try:
        with atomic_dir(path, overwrite) as tmp:
            write_sharded(tmp, ((tm.mcore, full[: cfg.vocab_size] if tm.kind == VOCAB else full)
                                for tm, full in stream), max_shard_bytes, metadata={"format": FORMAT})
            (tmp / "hf").mkdir()
            if hf_side_dir is not None:
                copy_side_files(Path(hf_side_dir), tmp / "hf")
            _write_meta(tmp, cfg, hf_config)
    finally:
        if dist.is_initialized():
            dist.barrier()


def export_hf(chunks: Sequence[torch.nn.Module], cfg: ModelConfig, path, *, hf_config: dict,
              hf_side_dir=None, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a live model straight to an HF directory (streaming exporter; global rank 0 writes)."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    groups = iter_hf_weights(chunks, cfg, max_bytes=max_shard_bytes, all_ranks=False)
    if not rank0:
        for _ in groups:
            pass
        dist.barrier()
        return
    try:
        with atomic_dir(path, overwrite) as tmp:
            write_sharded(tmp, (item for g in groups for item in g), max_shard_bytes)
            if hf_side_dir is not None:
                copy_side_files(Path(hf_side_dir), tmp)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    finally:
        if dist.is_initialized():
            dist.barrier()
