"""HF tensors <-> canonical Megatron tensors (model-free), shape checks, and the per-shard HF row blocks.

Canonical tensors keep the *unpadded* vocabulary; `pad_vocab` pads embedding / output rows for a TP size
(Megatron pads the vocab to a multiple of TP) and the export side strips them again.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterable

import torch

from mgs_megatron.megatron.model import ConfigError, ModelConfig
from mgs_megatron.convert.base import (GATE_UP, QKV, VOCAB, TensorMap, fuse_gate_up, fuse_qkv, local_name,
                                       qkv_rows, split_gate_up, split_qkv, tensor_maps)

# Tensors some HF checkpoints carry that carry no weights we need (old Llama exports saved rotary buffers).
_IGNORABLE_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class ConversionError(ValueError):
    """Missing / unexpected tensors or a shape mismatch; the message names the tensor."""


@functools.lru_cache(maxsize=8)  # ModelConfig is frozen; the table is looked up once per tensor
def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor shapes for a ModelConfig (a shared dict: do not modify)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
           "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
           "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
           "mlp.down_proj.weight": (h, f)}
    if cfg.qkv_bias:
        per.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if cfg.qk_norm:
        per.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in per.items()})
    return out


def check_hf_names(names: Iterable[str], cfg: ModelConfig) -> None:
    """Raise ConversionError naming missing or unexpected HF tensors."""
    expected = hf_shapes(cfg)
    names = set(names)
    missing = sorted(set(expected) - names)
    extra = sorted(n for n in names - set(expected) if not _IGNORABLE_HF.search(n)
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight"))  # some tied exports keep a copy
    if missing:
        raise ConversionError(f"HF checkpoint is missing tensor(s) {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if extra:
        raise ConversionError(f"HF checkpoint has unexpected tensor(s) {extra[:8]}" + (" ..." if len(extra) > 8 else "")
                              + f" for architecture={cfg.architecture!r}")


def _checked(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ConversionError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def hf_to_mcore(tm: TensorMap, get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The canonical tensor of one TensorMap from its HF tensors (`get(hf_name)`), shapes checked."""
    shapes = hf_shapes(cfg)
    parts = [_checked(n, get(n), shapes[n]) for n in tm.hf]
    if tm.kind == QKV:
        return fuse_qkv(*parts, cfg)
    if tm.kind == GATE_UP:
        return fuse_gate_up(*parts)
    return parts[0]


def mcore_shape(tm: TensorMap, cfg: ModelConfig) -> tuple[int, ...]:
    shapes = [hf_shapes(cfg)[n] for n in tm.hf]
    return (sum(s[0] for s in shapes),) + shapes[0][1:]


def mcore_to_hf(tm: TensorMap, full: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """HF tensors of one canonical tensor (vocab padding stripped), shape checked."""
    if tm.kind == VOCAB:
        full = full[: cfg.vocab_size]
    _checked(tm.mcore, full, mcore_shape(tm, cfg))
    if tm.kind == QKV:
        return list(zip(tm.hf, split_qkv(full, cfg)))
    if tm.kind == GATE_UP:
        return list(zip(tm.hf, split_gate_up(full)))
    return [(tm.hf[0], full)]


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def convert_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole HF state dict -> canonical (unpadded vocab, local-spec norm names)."""
    check_hf_names(hf_sd, cfg)
    return {tm.mcore: hf_to_mcore(tm, hf_sd.__getitem__, cfg) for tm in tensor_maps(cfg)}


def convert_mcore_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical state dict (either norm naming, padded or not) -> HF state dict."""
    sd = {local_name(k): v for k, v in sd.items()}
    check_mcore_names(sd, cfg)
    return {n: t for tm in tensor_maps(cfg) for n, t in mcore_to_hf(tm, sd[tm.mcore], cfg)}


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


# ------------------------------------------------------------------------------------ HF blocks of a TP shard
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _map_for(mcore_name: str, cfg: ModelConfig) -> TensorMap:
    name = local_name(mcore_name)
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        return TensorMap(name, ("model.embed_tokens.weight",), VOCAB)
    for tm in tensor_maps_for_name(name, cfg):
        if tm.mcore == name:
            return tm
    raise ConversionError(f"parameter {mcore_name!r} has no Hugging Face counterpart for {cfg.architecture!r}")


def tensor_maps_for_name(name: str, cfg: ModelConfig) -> list[TensorMap]:
    from mgs_megatron.convert.base import layer_maps

    m = _LAYER.match(name)
    if m:
        layer = int(m.group(1))
        if layer >= cfg.num_layers:
            raise ConversionError(f"parameter {name!r}: layer {layer} >= num_layers={cfg.num_layers}")
        return layer_maps(cfg, layer)
    return [tm for tm in tensor_maps(cfg) if tm.layer is None]


def hf_module_blocks(mcore_name: str, local_shape, cfg: ModelConfig, tp_size: int = 1) -> list[tuple[int, int, str]]:
    """Row blocks (row_start, row_end, hf_name) of a TP-local Megatron shard, in row order.

    `mcore_name` is the canonical name (GLOBAL layer number; either norm naming). linear_qkv (weight or bias) ->
    per local query group [q rows, k rows, v rows] named q_proj/k_proj/v_proj; linear_fc1 -> [gate rows, up rows];
    everything else one block covering the shard (the embedding / output shard includes any vocab padding rows).
    The TE-spec fused norms (`linear_qkv.layer_norm_weight`) are 1-D [hidden] and map to the layer norm.
    """
    rows = int(local_shape[0])
    if mcore_name.endswith("layer_norm_weight"):
        tm = _map_for(local_name(mcore_name), cfg)
        return [(0, rows, tm.hf[0])]
    tm = _map_for(mcore_name, cfg)
    if tm.kind == QKV:
        if cfg.num_key_value_heads % tp_size:
            raise ConfigError(f"num_key_value_heads={cfg.num_key_value_heads} is not divisible by tp_size={tp_size}")
        groups = cfg.num_key_value_heads // tp_size
        sizes = qkv_rows(cfg)
        if rows != groups * sum(sizes):
            raise ConversionError(f"parameter {mcore_name!r}: local rows {rows} != {groups} query groups x {sum(sizes)}")
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
