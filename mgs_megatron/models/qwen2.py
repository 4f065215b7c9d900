"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): q/k/v carry a bias; head_dim is always hidden_size / num_attention_heads."""

from __future__ import annotations

from mgs_megatron.errors import ConfigError
from mgs_megatron.models.config import ModelConfig
from mgs_megatron.models.hf_config import common_fields, reject, require
from mgs_megatron.models.registry import Architecture
from mgs_megatron.models.tensor_map import LayerTensors, TensorMap


def parse_config(hf: dict) -> ModelConfig:
    hidden, heads = int(require(hf, "hidden_size")), int(require(hf, "num_attention_heads"))
    if hidden % heads:
        raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} (qwen2 derives "
                          f"head_dim from them)")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConfigError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {hidden // heads}: "
                          f"qwen2 (and vLLM's Qwen2) derive head_dim from hidden_size")
    reject(hf, "use_sliding_window", "qwen2")
    return common_fields(hf, "qwen2", hidden // heads, qkv_bias=True)


def check(cfg: ModelConfig) -> None:
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:  # HF and vLLM derive head_dim this way
        raise ConfigError(f"head_dim={cfg.head_dim} does not match hidden_size / num_attention_heads = "
                          f"{cfg.hidden_size} / {cfg.num_attention_heads} (required for architecture 'qwen2')")


def layer_tensors(cfg: ModelConfig, i: int) -> list[TensorMap]:
    t = LayerTensors(cfg, i)
    return [t.input_norm(), t.qkv(), t.qkv_bias(), t.attn_out(), t.mlp_norm(), t.gate_up(), t.down()]


ARCHITECTURE = Architecture("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), parse_config, layer_tensors, check)
