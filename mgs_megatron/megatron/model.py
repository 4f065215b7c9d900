"""Build a Megatron-Core GPTModel for Llama-family shapes from an architecture-neutral ModelConfig.

`ModelConfig` (models/) holds what a Hugging Face config says;
`ParallelConfig` and `PrecisionConfig` are the explicit dataclass configs of the layout and numerics.
On CPU the local layer spec is used; with Transformer Engine installed and device cuda, the TE spec.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from mgs_megatron.errors import ConfigError
from mgs_megatron.models import ModelConfig, RopeScaling


@dataclass(frozen=True)
class ParallelConfig:
    """Megatron's model-parallel layout; data parallelism is what remains of the world size."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (divides the attention heads, the query groups and the MLP width)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (divide the layers)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage (interleaved schedule; null: one)."""

    def check(self, model: ModelConfig, world_size: Optional[int] = None) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ConfigError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be >= 1")
        if model.num_attention_heads % tp:
            raise ConfigError(f"num_attention_heads={model.num_attention_heads} is not divisible by "
                              f"tensor_model_parallel_size={tp}")
        if model.num_key_value_heads % tp:
            raise ConfigError(f"num_key_value_heads={model.num_key_value_heads} is not divisible by "
                              f"tensor_model_parallel_size={tp}")
        if model.intermediate_size % tp:
            raise ConfigError(f"intermediate_size={model.intermediate_size} is not divisible by "
                              f"tensor_model_parallel_size={tp}")
        chunks = pp * (self.virtual_pipeline_model_parallel_size or 1)
        if model.num_layers % chunks:
            raise ConfigError(f"num_layers={model.num_layers} is not divisible by pipeline_model_parallel_size={pp}"
                              f" x virtual_pipeline_model_parallel_size={self.virtual_pipeline_model_parallel_size}")
        if world_size is not None and world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by tensor_model_parallel_size={tp} x "
                              f"pipeline_model_parallel_size={pp}")


@dataclass(frozen=True)
class PrecisionConfig:
    params_dtype: torch.dtype = torch.float32  # bf16 params keep fp32 main grads/params in the optimizer
    calculate_per_token_loss: bool = False


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 1) -> int:
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def fusion_flags(device: str, te: bool, apex_grad_accum: bool) -> dict:
    """Which of Megatron's fused kernels to turn on. On a GPU: the jit-scripted SwiGLU and bias-dropout-add (plain
    torch) always; softmax and rope fusion with Transformer Engine (the TE spec brings them; without it Megatron
    would import absent CUDA extensions); gradient-accumulation fusion with TE's linear layers or apex's
    fused_weight_gradient_mlp_cuda. On the CPU none (they are CUDA kernels)."""
    gpu = device == "cuda"
    return dict(bias_activation_fusion=gpu, bias_dropout_fusion=gpu, masked_softmax_fusion=gpu and te,
                apply_rope_fusion=gpu and te, persist_layer_norm=False,
                gradient_accumulation_fusion=gpu and (te or apex_grad_accum))


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig = PrecisionConfig(),
                       *, device: str = "cpu", initialize: bool = True, use_te: bool = False, **overrides):
    """ModelConfig -> megatron.core TransformerConfig (no dropout: RL recomputes exact logprobs).

    On the CPU full weights are drawn on the CPU and then split (the same init at every TP size); on a GPU each rank
    draws its own shard there. `initialize=False` draws nothing (the weights are about to be loaded).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel.check(model)
    bf16 = precision.params_dtype == torch.bfloat16
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.intermediate_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        params_dtype=precision.params_dtype,
        pipeline_dtype=precision.params_dtype,
        bf16=bf16,
        calculate_per_token_loss=precision.calculate_per_token_loss,
        use_cpu_initialization=device != "cuda",
        perform_initialization=initialize,
        **fusion_flags(device, use_te, importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None),
        attention_softmax_in_fp32=True,
        init_method_std=0.02,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec(model: ModelConfig, use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_norm, normalization="RMSNorm")


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig = PrecisionConfig(),
                    *, device: str = "cpu", initialize: bool = True, use_te: Optional[bool] = None,
                    vp_stage: Optional[int] = None, **config_overrides):
    """One GPTModel chunk for this rank's pipeline stage (parallel_state must be initialised). `device`: where the
    weights are made ('cuda': on the current GPU, Transformer Engine's spec when installed); `initialize=False` when a
    checkpoint will overwrite every weight."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if use_te is None:
        use_te = device == "cuda" and transformer_engine_available()
    config = transformer_config(model, parallel, precision, device=device, initialize=initialize, use_te=use_te,
                                **config_overrides)
    kwargs = {}
    if parallel.virtual_pipeline_model_parallel_size is not None:
        kwargs["vp_stage"] = vp_stage
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, **kwargs)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, **kwargs)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, use_te),
        vocab_size=padded_vocab_size(model.vocab_size, parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_theta,
        parallel_output=True,
        **kwargs,
    )
    if model.rope_scaling is not None:
        _apply_llama3_rope_scaling(gpt, model)
    return gpt


def llama3_inv_freq(head_dim: int, theta: float, scaling: RopeScaling, device=None) -> torch.Tensor:
    """Hugging Face's "llama3" rope frequencies (Megatron hard-codes factor 8 / 1 / 4 / 8192 otherwise)."""
    import math

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _apply_llama3_rope_scaling(gpt, model: ModelConfig) -> None:
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if rotary is None:
        raise ConfigError("rope_scaling is set but the model has no rotary embedding")
    rotary.inv_freq = llama3_inv_freq(model.head_dim, model.rope_theta, model.rope_scaling,
                                      device=rotary.inv_freq.device)


__all__ = ["ParallelConfig", "PrecisionConfig", "build_gpt_model", "fusion_flags",
           "transformer_config", "padded_vocab_size", "llama3_inv_freq"]
