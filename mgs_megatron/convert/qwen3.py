"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm on q and k, explicit head_dim (may differ from hidden / heads)."""

from __future__ import annotations

from mgs_megatron.megatron.model import ConfigError, ModelConfig
from mgs_megatron.convert.base import common_fields, require

MODEL_TYPES = ("qwen3",)
ARCHITECTURES = ("Qwen3ForCausalLM",)


def model_config(hf: dict) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=True is not supported for qwen3")
    head_dim = hf.get("head_dim") or require(hf, "hidden_size") // require(hf, "num_attention_heads")
    return common_fields(hf, head_dim, architecture="qwen3", qk_norm=True, qkv_bias=bool(hf.get("attention_bias")))
