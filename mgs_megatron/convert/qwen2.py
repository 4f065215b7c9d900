"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): q/k/v carry a bias; head_dim is always hidden_size / num_attention_heads."""

from __future__ import annotations

from mgs_megatron.megatron.model import ConfigError, ModelConfig
from mgs_megatron.convert.base import common_fields, require

MODEL_TYPES = ("qwen2",)
ARCHITECTURES = ("Qwen2ForCausalLM",)


def model_config(hf: dict) -> ModelConfig:
    hidden, heads = int(require(hf, "hidden_size")), int(require(hf, "num_attention_heads"))
    if hidden % heads:
        raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} (qwen2 derives "
                          f"head_dim from them)")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConfigError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {hidden // heads}: "
                          f"qwen2 (and vLLM's Qwen2) derive head_dim from hidden_size")
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=True is not supported for qwen2")
    return common_fields(hf, hidden // heads, architecture="qwen2", qkv_bias=True)
