"""Shared pieces of the per-architecture adapters: HF config reading, the tensor-map table, qkv/gate-up fusing.

Canonical Megatron form (see megatron/state.py): global layer numbers, full tensors, linear_fc1 = [gate; up],
linear_qkv rows interleaved per query group as [q heads of the group, k head, v head] (each head_dim rows).
Norm names follow the LOCAL spec (`input_layernorm`, `pre_mlp_layernorm`); `te_names()` renames them to the
Transformer-Engine spec (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from mgs_megatron.megatron.model import ConfigError, ModelConfig, RopeScaling

# kinds of TensorMap
COPY, VOCAB, QKV, GATE_UP = "copy", "vocab", "qkv", "gate_up"

# LOCAL-spec name suffix -> TE-spec name suffix (fused norms)
_TE_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class TensorMap:
    """One canonical Megatron tensor and the HF tensor(s) it is made of (several when fused)."""

    mcore: str
    hf: tuple[str, ...]
    kind: str = COPY
    layer: Optional[int] = None


def te_name(mcore: str) -> str:
    for local, te in _TE_NORMS.items():
        if mcore.endswith("." + local):
            return mcore[: -len(local)] + te
    return mcore


def local_name(mcore: str) -> str:
    for local, te in _TE_NORMS.items():
        if mcore.endswith("." + te):
            return mcore[: -len(te)] + local
    return mcore


def uses_te_norms(param_names) -> bool:
    """True when the model's parameter names are TE-spec (norms fused into linear_qkv / linear_fc1)."""
    return any(n.endswith("layer_norm_weight") for n in param_names)


# ---------------------------------------------------------------------------------------------- HF config reading
def hf_config_dict(hf_config: Any) -> dict:
    """A config.json dict from a dict or a transformers PretrainedConfig."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConfigError(f"hf_config: expected a dict or a transformers config, got {type(hf_config).__name__}")


def require(hf: dict, field: str):
    if hf.get(field) is None:
        raise ConfigError(f"HF config field {field!r} is missing (model_type={hf.get('model_type')!r})")
    return hf[field]


def read_rope(hf: dict) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, llama3 scaling) from transformers-5 `rope_parameters` or older `rope_theta` / `rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" not in params and len(params) and \
            all(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError("rope_parameters: per-layer-type rope parameters are not supported")
    if isinstance(params, Mapping):
        theta, scaling, where = params.get("rope_theta", hf.get("rope_theta")), params, "rope_parameters"
    else:
        theta, scaling, where = hf.get("rope_theta"), hf.get("rope_scaling") or {}, "rope_scaling"
    if theta is None:
        raise ConfigError("HF config field 'rope_theta' (or rope_parameters.rope_theta) is missing")
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"{where}.rope_type={rope_type!r} is not supported (supported: 'default', 'llama3')")
    fields = {}
    for f in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if scaling.get(f) is None:
            raise ConfigError(f"{where}.{f} is missing for rope_type='llama3'")
        fields[f] = scaling[f]
    fields["original_max_position_embeddings"] = int(fields["original_max_position_embeddings"])
    return float(theta), RopeScaling(**{k: (float(v) if k != "original_max_position_embeddings" else v)
                                        for k, v in fields.items()})


def check_activation(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu': gated SiLU MLP)")


def common_fields(hf: dict, head_dim: int, **extra) -> ModelConfig:
    """The ModelConfig fields every supported architecture reads the same way."""
    check_activation(hf)
    theta, scaling = read_rope(hf)
    heads = int(require(hf, "num_attention_heads"))
    return ModelConfig(
        architecture=extra.pop("architecture"),
        vocab_size=int(require(hf, "vocab_size")),
        hidden_size=int(require(hf, "hidden_size")),
        intermediate_size=int(require(hf, "intermediate_size")),
        num_layers=int(require(hf, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **extra,
    )


# ------------------------------------------------------------------------------------------------- tensor table
def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every canonical tensor in model order (embedding, layers 0.., final norm, output layer)."""
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)]
    for i in range(cfg.num_layers):
        maps += layer_maps(cfg, i)
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), VOCAB))
    return maps


def layer_maps(cfg: ModelConfig, i: int) -> list[TensorMap]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    attn = h + "self_attn."
    out = [
        TensorMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",), COPY, i),
        TensorMap(m + "self_attention.linear_qkv.weight",
                  tuple(f"{attn}{p}_proj.weight" for p in "qkv"), QKV, i),
    ]
    if cfg.qkv_bias:
        out.append(TensorMap(m + "self_attention.linear_qkv.bias", tuple(f"{attn}{p}_proj.bias" for p in "qkv"),
                             QKV, i))
    if cfg.qk_norm:
        out += [TensorMap(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), COPY, i),
                TensorMap(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), COPY, i)]
    out += [
        TensorMap(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), COPY, i),
        TensorMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), COPY, i),
        TensorMap(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), GATE_UP, i),
        TensorMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), COPY, i),
    ]
    return out


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


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()
