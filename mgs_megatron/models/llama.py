"""Llama 2 / 3.x (LlamaForCausalLM): optional explicit head_dim, "llama3" rope scaling, tied embeddings (1B/3B)."""

from __future__ import annotations

from mgs_megatron.models.config import ModelConfig
from mgs_megatron.models.hf_config import common_fields, explicit_head_dim, reject
from mgs_megatron.models.registry import Architecture
from mgs_megatron.models.tensor_map import LayerTensors, TensorMap


def parse_config(hf: dict) -> ModelConfig:
    reject(hf, "attention_bias", "llama", "the Megatron mapping has no q/k/v/o bias")
    reject(hf, "mlp_bias", "llama")
    return common_fields(hf, "llama", explicit_head_dim(hf))


def layer_tensors(cfg: ModelConfig, i: int) -> list[TensorMap]:
    t = LayerTensors(cfg, i)
    return [t.input_norm(), t.qkv(), t.attn_out(), t.mlp_norm(), t.gate_up(), t.down()]


ARCHITECTURE = Architecture("llama", ("llama",), ("LlamaForCausalLM",), parse_config, layer_tensors)
