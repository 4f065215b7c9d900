"""Llama 2/3.x (LlamaForCausalLM): optional explicit head_dim, "llama3" rope scaling, tied embeddings (1B/3B)."""

from __future__ import annotations

from mgs_megatron.megatron.model import ConfigError, ModelConfig
from mgs_megatron.convert.base import common_fields, require

MODEL_TYPES = ("llama",)
ARCHITECTURES = ("LlamaForCausalLM",)


def model_config(hf: dict) -> ModelConfig:
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias=True is not supported for llama (Megatron mapping has no qkv/o bias)")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not supported for llama")
    head_dim = hf.get("head_dim") or require(hf, "hidden_size") // require(hf, "num_attention_heads")
    return common_fields(hf, head_dim, architecture="llama")
