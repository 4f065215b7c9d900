"""Mistral (MistralForCausalLM, v0.3 and later): Llama-shaped (no biases, explicit head_dim allowed); sliding-window
attention (v0.1's 4096-token window) is not supported."""

from __future__ import annotations

from mgs_megatron.models.config import ModelConfig
from mgs_megatron.models.hf_config import common_fields, explicit_head_dim, reject
from mgs_megatron.models.registry import Architecture
from mgs_megatron.models.tensor_map import LayerTensors, TensorMap


def parse_config(hf: dict) -> ModelConfig:
    reject(hf, "sliding_window", "mistral", "sliding-window attention; v0.3 and later set it to null")
    return common_fields(hf, "mistral", explicit_head_dim(hf))


def layer_tensors(cfg: ModelConfig, i: int) -> list[TensorMap]:
    t = LayerTensors(cfg, i)
    return [t.input_norm(), t.qkv(), t.attn_out(), t.mlp_norm(), t.gate_up(), t.down()]


ARCHITECTURE = Architecture("mistral", ("mistral",), ("MistralForCausalLM",), parse_config, layer_tensors)
