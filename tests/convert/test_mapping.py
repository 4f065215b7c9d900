"""Config parsing, tensor mapping, HF row blocks, error messages (single process, no Megatron model)."""

from __future__ import annotations

import pytest
import torch

from mgs_megatron.errors import ConfigError, ConversionError
from mgs_megatron.megatron.model import ParallelConfig
from mgs_megatron.models import RopeScaling, model_config_from_hf, tensor_maps
from mgs_megatron.models.mapping import (
    convert_hf_state_dict,
    convert_mcore_state_dict,
    fuse_qkv,
    hf_module_blocks,
    split_qkv,
)
from tests.convert import models


def _hf_dict(name):
    cls_name, kwargs = models.specs()[name]
    import transformers

    return getattr(transformers, cls_name)(**kwargs).to_dict()


def test_llama3_rope_new_and_old_style():
    new = model_config_from_hf(_hf_dict("llama_tied"))
    assert new.architecture == "llama" and new.tie_word_embeddings and new.head_dim == 32
    assert new.rope_theta == 500000.0
    assert new.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
    old = dict(_hf_dict("llama_tied"))
    del old["rope_parameters"]
    old.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    assert model_config_from_hf(old) == new


def test_qwen_configs():
    q2 = model_config_from_hf(_hf_dict("qwen2"))
    assert (q2.qkv_bias, q2.qk_norm, q2.head_dim, q2.heads_per_group) == (True, False, 32, 7)
    q3 = model_config_from_hf(_hf_dict("qwen3"))
    assert (q3.qkv_bias, q3.qk_norm, q3.head_dim) == (False, True, 32)
    by_arch = dict(_hf_dict("qwen3"), model_type="custom", architectures=["Qwen3ForCausalLM"])
    assert model_config_from_hf(by_arch) == q3


@pytest.mark.parametrize("patch, field", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type='gemma'"),
    ({"model_type": "mistral", "architectures": ["Qwen2ForCausalLM"]},  # the two disagree: no silent guess
     "model_type='mistral' is 'mistral' but architectures=['Qwen2ForCausalLM'] is 'qwen2'"),
    ({"head_dim": 64}, "head_dim=64"),
    ({"hidden_size": 450}, "hidden_size=450"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type='yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"vocab_size": None}, "'vocab_size'"),
])
def test_config_errors_name_the_field(patch, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace(".", r"\.")):
        model_config_from_hf(dict(_hf_dict("qwen2"), **patch))


def test_mistral_config():
    m = model_config_from_hf(_hf_dict("mistral"))
    assert (m.architecture, m.head_dim, m.qkv_bias, m.qk_norm, m.rope_theta) == ("mistral", 32, False, False, 1e6)
    by_class = dict(_hf_dict("mistral"), model_type="custom", architectures=["MistralForCausalLM"])
    assert model_config_from_hf(by_class) == m
    with pytest.raises(ConfigError, match="sliding_window=4096 is not supported for mistral"):
        model_config_from_hf(dict(_hf_dict("mistral"), sliding_window=4096))


def test_tp_not_dividing_heads_names_field():
    cfg = model_config_from_hf(_hf_dict("qwen2"))  # 14 heads / 2 kv heads
    with pytest.raises(ConfigError, match="num_attention_heads=14 .*tensor_model_parallel_size=4"):
        ParallelConfig(4, 1).check(cfg)
    with pytest.raises(ConfigError, match="num_key_value_heads=2"):
        hf_module_blocks("decoder.layers.0.self_attention.linear_qkv.weight", (0, 448), cfg, tp_size=4)


def test_qkv_fuse_layout_per_query_group():
    cfg = model_config_from_hf(_hf_dict("qwen2"))  # 2 groups x (7 q heads + k + v), head_dim 32
    d = cfg.head_dim
    q = torch.arange(14 * d).float()
    k = 1000 + torch.arange(2 * d).float()
    v = 2000 + torch.arange(2 * d).float()
    fused = fuse_qkv(q, k, v, cfg)
    assert torch.equal(fused[: 7 * d], q[: 7 * d])  # group 0: its 7 q heads, then k head 0, then v head 0
    assert torch.equal(fused[7 * d: 8 * d], k[:d]) and torch.equal(fused[8 * d: 9 * d], v[:d])
    assert torch.equal(fused[9 * d: 16 * d], q[7 * d:])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v)))


@pytest.mark.parametrize("name", list(models.specs()))
def test_state_dict_round_trip_bit_exact(name):
    hf = models.build(name)
    cfg = model_config_from_hf(hf.config)
    sd = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    canon = convert_hf_state_dict(sd, cfg)
    assert list(canon) == [tm.mcore for tm in tensor_maps(cfg)]
    back = convert_mcore_state_dict(canon, cfg)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_bad_tensors_are_named():
    hf = models.build("qwen3")
    cfg = model_config_from_hf(hf.config)
    sd = dict(hf.state_dict())
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_norm.weight"}
    with pytest.raises(ConversionError, match=r"missing.*model\.layers\.1\.self_attn\.k_norm\.weight"):
        convert_hf_state_dict(missing, cfg)
    with pytest.raises(ConversionError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_proj\.bias"):
        convert_hf_state_dict(dict(sd, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(256)}), cfg)
    bad = dict(sd, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(255, 128)})
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(255, 128\)"):
        convert_hf_state_dict(bad, cfg)


def test_hf_module_blocks():
    cfg = model_config_from_hf(_hf_dict("qwen2"))  # 14 heads, 2 groups, head_dim 32, hidden 448
    a = "decoder.layers.1.self_attention."
    full = hf_module_blocks(a + "linear_qkv.weight", (2 * 9 * 32, 448), cfg, 1)
    assert len(full) == 6 and full[:3] == [(0, 224, "model.layers.1.self_attn.q_proj.weight"),
                                           (224, 256, "model.layers.1.self_attn.k_proj.weight"),
                                           (256, 288, "model.layers.1.self_attn.v_proj.weight")]
    assert hf_module_blocks(a + "linear_qkv.bias", (288,), cfg, 2) == [
        (0, 224, "model.layers.1.self_attn.q_proj.bias"), (224, 256, "model.layers.1.self_attn.k_proj.bias"),
        (256, 288, "model.layers.1.self_attn.v_proj.bias")]
    assert hf_module_blocks("decoder.layers.0.mlp.linear_fc1.weight", (256, 448), cfg, 2) == [
        (0, 128, "model.layers.0.mlp.gate_proj.weight"), (128, 256, "model.layers.0.mlp.up_proj.weight")]
    assert hf_module_blocks("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", (448,), cfg, 2) == [
        (0, 448, "model.layers.0.input_layernorm.weight")]
    assert hf_module_blocks("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", (448,), cfg, 2) == [
        (0, 448, "model.layers.0.post_attention_layernorm.weight")]  # TE name of the pre-MLP norm
    assert hf_module_blocks("decoder.layers.0.pre_mlp_layernorm.weight", (448,), cfg) == [
        (0, 448, "model.layers.0.post_attention_layernorm.weight")]
    assert hf_module_blocks("embedding.word_embeddings.weight", (51, 448), cfg, 2) == [
        (0, 51, "model.embed_tokens.weight")]
    tied = model_config_from_hf(_hf_dict("llama_tied"))
    assert hf_module_blocks("output_layer.weight", (101, 128), tied) == [(0, 101, "model.embed_tokens.weight")]
    with pytest.raises(ConversionError, match="decoder.layers.7"):
        hf_module_blocks("decoder.layers.7.mlp.linear_fc2.weight", (448, 128), cfg)
