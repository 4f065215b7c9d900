"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm on q and k, explicit head_dim (may differ from hidden / heads),
optional q/k/v bias (`attention_bias`)."""

from __future__ import annotations

from mgs_megatron.models.config import ModelConfig
from mgs_megatron.models.hf_config import common_fields, explicit_head_dim, reject
from mgs_megatron.models.registry import Architecture
from mgs_megatron.models.tensor_map import LayerTensors, TensorMap


def parse_config(hf: dict) -> ModelConfig:
    reject(hf, "use_sliding_window", "qwen3")
    return common_fields(hf, "qwen3", explicit_head_dim(hf), qk_norm=True, qkv_bias=bool(hf.get("attention_bias")))


def layer_tensors(cfg: ModelConfig, i: int) -> list[TensorMap]:
    t = LayerTensors(cfg, i)
    bias = [t.qkv_bias()] if cfg.qkv_bias else []
    return [t.input_norm(), t.qkv(), *bias, t.q_norm(), t.k_norm(), t.attn_out(), t.mlp_norm(), t.gate_up(), t.down()]


ARCHITECTURE = Architecture("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), parse_config, layer_tensors)
