"""Megatron parameters -> the paper's modules: a surgery ParamLayout per local parameter shard.

The names are canonical Megatron names (global layer numbers, see state.py); the blocks come from the HF tensor
map (models/), so `parameter` granularity means one module per Hugging Face tensor, with the fused linear_qkv
split per query group into q/k/v and linear_fc1 into gate/up on every TP shard.
"""

from __future__ import annotations

from typing import Optional

import torch

from mgs_megatron.errors import ConfigError
from mgs_megatron.megatron.state import named_global_parameters, unwrap
from mgs_megatron.models import ModelConfig
from mgs_megatron.models.mapping import hf_module_blocks
from mgs_megatron.surgery import ParamLayout
from mgs_megatron.surgery.layout import module_layer


def model_config_from_megatron(gpt) -> ModelConfig:
    """A ModelConfig (for HF naming) read off a GPTModel's TransformerConfig, when the caller gives none."""
    tc = gpt.config
    arch = "qwen3" if tc.qk_layernorm else ("qwen2" if tc.add_qkv_bias else "llama")
    if arch == "qwen2" and tc.kv_channels * tc.num_attention_heads != tc.hidden_size:
        arch = "llama"  # naming is identical; only qwen2's head_dim rule differs
    vocab = gpt.vocab_size if hasattr(gpt, "vocab_size") else 1
    return ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=tc.hidden_size,
                       intermediate_size=tc.ffn_hidden_size, num_layers=tc.num_layers,
                       num_attention_heads=tc.num_attention_heads,
                       num_key_value_heads=tc.num_query_groups or tc.num_attention_heads,
                       head_dim=tc.kv_channels, qkv_bias=tc.add_qkv_bias, qk_norm=tc.qk_layernorm,
                       tie_word_embeddings=gpt.share_embeddings_and_output_weights)


def param_layouts(chunks, model_config: Optional[ModelConfig] = None) -> dict[torch.nn.Parameter, ParamLayout]:
    """ParamLayout of every local parameter (TP-local shape, canonical name, HF blocks)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    cfg = model_config or model_config_from_megatron(unwrap(chunks[0]))
    layouts = {}
    for name, p, gpt in named_global_parameters(chunks):
        if name == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
            name = "embedding.word_embeddings.weight"  # the tied copy on the last stage: the same module
        try:
            blocks = hf_module_blocks(name, tuple(p.shape), cfg, tp)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"MGS module map: parameter {name!r} {tuple(p.shape)}: {e}") from e
        layouts[p] = ParamLayout(name=name, shape=tuple(p.shape) or (1,), layer=module_layer(name),
                                 blocks=tuple(blocks))
    return layouts


def counted_once(param: torch.nn.Parameter) -> bool:
    """Whether this rank's copy of a parameter enters the Gram: TP-duplicated parameters (norms) only on TP rank 0,
    the tied output-layer copy of the embedding (PP > 1) only on the first stage -- as Megatron's grad-norm does."""
    from megatron.core import parallel_state as ps

    if getattr(param, "shared", False) and not ps.is_pipeline_first_stage(ignore_virtual=True):
        return False
    tp_split = getattr(param, "tensor_model_parallel", False)
    return tp_split or ps.get_tensor_model_parallel_rank() == 0


__all__ = ["param_layouts", "counted_once", "model_config_from_megatron"]
