"""HF tensors <-> canonical Megatron tensors (model-free): fusing, splitting, shape and name checks, and the HF row
blocks of a TP-local Megatron shard (what MGS's `parameter` granularity calls a module).

Canonical tensors keep the *unpadded* vocabulary; `pad_vocab` pads embedding / output rows for a TP size
(Megatron pads the vocab to a multiple of TP) and the export side strips them again.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from mgs_megatron.errors import ConfigError, ConversionError
from mgs_megatron.models.config import ModelConfig
from mgs_megatron.models.tensor_map import GATE_UP, QKV, VOCAB, TensorMap, hf_shapes, local_name, tensor_maps

# Tensors some HF checkpoints carry that hold no weights we need (old Llama exports saved rotary buffers).
_IGNORABLE_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------------------------------ fuse / split
def qkv_rows(cfg: ModelConfig) -> tuple[int, int, int]:
    """Rows of q, k, v inside one query group of linear_qkv."""
    d = cfg.head_dim
    return cfg.heads_per_group * d, d, d


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    g = cfg.num_key_value_heads
    rest = q.shape[1:]
    parts = [t.reshape(g, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, rest = cfg.num_key_value_heads, qkv.shape[1:]
    q, k, v = qkv.reshape(g, -1, *rest).split(list(qkv_rows(cfg)), dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


# ------------------------------------------------------------------------------------------ one tensor map entry
def _checked(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ConversionError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def hf_to_mcore(tm: TensorMap, get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The canonical tensor of one TensorMap from its HF tensors (`get(hf_name)`), shapes checked."""
    parts = [_checked(n, get(n), s) for n, s in zip(tm.hf, tm.shapes)]
    if tm.kind == QKV:
        return fuse_qkv(*parts, cfg)
    if tm.kind == GATE_UP:
        return torch.cat(parts, dim=0)
    return parts[0]


def mcore_to_hf(tm: TensorMap, full: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """HF tensors of one canonical tensor (vocab padding stripped), shape checked."""
    if tm.kind == VOCAB:
        full = full[: cfg.vocab_size]
    _checked(tm.mcore, full, tm.mcore_shape)
    if tm.kind == QKV:
        return list(zip(tm.hf, split_qkv(full, cfg)))
    if tm.kind == GATE_UP:
        return list(zip(tm.hf, split_gate_up(full)))
    return [(tm.hf[0], full)]


# ----------------------------------------------------------------------------------------- whole state dicts
def check_hf_names(names: Iterable[str], cfg: ModelConfig) -> None:
    """Raise ConversionError naming missing or unexpected HF tensors."""
    expected = hf_shapes(cfg)
    names = set(names)
    missing = sorted(set(expected) - names)
    extra = sorted(n for n in names - set(expected) if not _IGNORABLE_HF.search(n)
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight"))  # some tied exports keep a copy
    if missing:
        raise ConversionError(f"HF checkpoint is missing tensor(s) {missing[:8]}"
                              + (" ..." if len(missing) > 8 else ""))
    if extra:
        raise ConversionError(f"HF checkpoint has unexpected tensor(s) {extra[:8]}" + (" ..." if len(extra) > 8 else "")
                              + f" for architecture={cfg.architecture!r}")


def check_mcore_names(names: Iterable[str], cfg: ModelConfig) -> None:
    expected = {tm.mcore for tm in tensor_maps(cfg)}
    names = {local_name(n) for n in names}
    if cfg.tie_word_embeddings:
        names.discard("output_layer.weight")
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing:
        raise ConversionError(f"Megatron checkpoint is missing tensor(s) {missing[:8]}")
    if extra:
        raise ConversionError(f"Megatron checkpoint has unexpected tensor(s) {extra[:8]}")


def convert_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole HF state dict -> canonical (unpadded vocab, local-spec norm names)."""
    check_hf_names(hf_sd, cfg)
    return {tm.mcore: hf_to_mcore(tm, hf_sd.__getitem__, cfg) for tm in tensor_maps(cfg)}


def convert_mcore_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical state dict (either norm naming, padded or not) -> HF state dict."""
    sd = {local_name(k): v for k, v in sd.items()}
    check_mcore_names(sd, cfg)
    return {n: t for tm in tensor_maps(cfg) for n, t in mcore_to_hf(tm, sd[tm.mcore], cfg)}


# ------------------------------------------------------------------------------------ HF blocks of a TP shard
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def map_for(mcore_name: str, cfg: ModelConfig) -> TensorMap:
    """The TensorMap of a canonical name (GLOBAL layer number, either norm naming); the tied output layer maps to
    the embedding."""
    name = local_name(mcore_name)
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        name = "embedding.word_embeddings.weight"
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_layers:
        raise ConversionError(f"parameter {mcore_name!r}: layer {m.group(1)} >= num_layers={cfg.num_layers}")
    for tm in tensor_maps(cfg):
        if tm.mcore == name:
            return tm
    raise ConversionError(f"parameter {mcore_name!r} has no Hugging Face counterpart for {cfg.architecture!r}")


def hf_module_blocks(mcore_name: str, local_shape, cfg: ModelConfig, tp_size: int = 1) -> list[tuple[int, int, str]]:
    """Row blocks (row_start, row_end, hf_name) of a TP-local Megatron shard, in row order.

    linear_qkv (weight or bias) -> per local query group [q rows, k rows, v rows] named q_proj/k_proj/v_proj;
    linear_fc1 -> [gate rows, up rows]; everything else one block covering the shard (the embedding / output shard
    includes any vocab padding rows). The TE-spec fused norms (`linear_qkv.layer_norm_weight`) are 1-D [hidden]
    and map to the layer norm.
    """
    rows = int(local_shape[0])
    tm = map_for(mcore_name, cfg)
    if tm.kind == QKV:
        if cfg.num_key_value_heads % tp_size:
            raise ConfigError(f"num_key_value_heads={cfg.num_key_value_heads} is not divisible by tp_size={tp_size}")
        groups = cfg.num_key_value_heads // tp_size
        sizes = qkv_rows(cfg)
        if rows != groups * sum(sizes):
            raise ConversionError(f"parameter {mcore_name!r}: local rows {rows} != {groups} query groups x "
                                  f"{sum(sizes)}")
        blocks, start = [], 0
        for _ in range(groups):
            for hf, n in zip(tm.hf, sizes):
                blocks.append((start, start + n, hf))
                start += n
        return blocks
    if tm.kind == GATE_UP:
        if rows % 2:
            raise ConversionError(f"parameter {mcore_name!r}: local rows {rows} are not [gate; up]")
        return [(0, rows // 2, tm.hf[0]), (rows // 2, rows, tm.hf[1])]
    return [(0, rows, tm.hf[0])]


__all__ = ["check_hf_names", "check_mcore_names", "convert_hf_state_dict", "convert_mcore_state_dict", "fuse_qkv",
           "hf_module_blocks", "hf_to_mcore", "map_for", "mcore_to_hf", "pad_vocab", "qkv_rows", "split_gate_up",
           "split_qkv"]
