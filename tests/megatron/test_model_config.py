"""Bad model / parallel configurations fail early with errors that name the field."""

import dataclasses

import pytest

from mgs_megatron.errors import ConfigError
from mgs_megatron.megatron.model import ParallelConfig
from mgs_megatron.models import ModelConfig
from mgs_megatron.testing.tiny import TINY_QWEN2


def test_unknown_architecture_names_field():
    with pytest.raises(ConfigError, match="architecture='gpt2'"):
        dataclasses.replace(TINY_QWEN2, architecture="gpt2")


def test_qwen2_head_dim_mismatch_names_field():
    with pytest.raises(ConfigError, match="head_dim=32"):
        dataclasses.replace(TINY_QWEN2, head_dim=32)


def test_llama_and_qwen3_accept_explicit_head_dim():
    for arch in ("llama", "qwen3"):
        dataclasses.replace(TINY_QWEN2, architecture=arch, qkv_bias=False, head_dim=32)


@pytest.mark.parametrize("field,value,tp", [("num_attention_heads", 6, 4), ("num_key_value_heads", 1, 2),
                                            ("intermediate_size", 129, 2)])
def test_tp_must_divide(field, value, tp):
    cfg = dataclasses.replace(TINY_QWEN2, architecture="llama", qkv_bias=False, **{field: value})
    with pytest.raises(ConfigError, match=f"{field}={value}.*tensor_model_parallel_size={tp}"):
        ParallelConfig(tensor_model_parallel_size=tp).check(cfg)


def test_pp_must_divide_layers():
    with pytest.raises(ConfigError, match="num_layers=2"):
        ParallelConfig(pipeline_model_parallel_size=4).check(TINY_QWEN2)


def test_gqa_groups_must_divide_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        ModelConfig("llama", vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1,
                    num_attention_heads=4, num_key_value_heads=3, head_dim=16)
