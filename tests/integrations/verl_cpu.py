"""What it takes to drive verl 0.9.1's Megatron engine on a CPU (gloo) - test side only, nothing of verl, mbridge
or megatron-core is edited; each is a runtime replacement, applied in the test's ranks:

  V0  Megatron-Core on the CPU: mgs_megatron's CPU backend (device literals, RNG tracker, streams; PLATFORM.md).
  V2  mbridge 0.15.1 builds Transformer Engine's layer spec unconditionally (mbridge/core/llm_bridge.py:149-151):
      NameError TENorm without TE -> the local spec.
  V3  with the local spec the norms are `input_layernorm.weight` / `pre_mlp_layernorm.weight`, not TE's fused names:
      mbridge's Qwen2 name maps gain them (else NotImplementedError: Unsupported parameter name).
  V4  verl seeds Megatron's model-parallel RNG tracker only when an accelerator exists
      (verl/workers/engine/megatron/utils.py): "cuda rng state model-parallel-rng is not added" -> seeded here.
  V5  verl's memory logging calls torch.cuda.mem_get_info / memory_reserved (its platform layer falls back to CUDA
      on a CPU-only host): "Expected a cuda device, but got: cpu" -> zeros.
  V6  verl's bshd path hands attention a [b, s] padding mask (True = real token). TE ignores it; Megatron's local
      DotProductAttention reads it as "True = masked" and then skips the causal mask: silently wrong log-probs.
      Rows are right-padded, so the default causal mask is exact for every real token -> the 2-D mask is dropped.
"""

from __future__ import annotations

import inspect


def apply() -> None:
    from mgs_megatron.megatron import cpu_backend

    cpu_backend.activate()  # V0
    _local_spec()  # V2, V3
    _seed()  # V4
    _memory_queries()  # V5
    _causal_mask()  # V6


def _local_spec() -> None:
    from mbridge.core.llm_bridge import LLMBridge
    from mbridge.models.qwen2 import Qwen2Bridge
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    def _get_transformer_layer_spec(self, vp_stage=None):
        kw = {"vp_stage": vp_stage} if "vp_stage" in inspect.signature(get_gpt_decoder_block_spec).parameters else {}
        self.has_vp_stage = bool(kw)
        return get_gpt_decoder_block_spec(self.config, use_transformer_engine=False, normalization="RMSNorm", **kw)

    LLMBridge._get_transformer_layer_spec = _get_transformer_layer_spec
    Qwen2Bridge._MLP_MAPPING = {**Qwen2Bridge._MLP_MAPPING, "pre_mlp_layernorm.weight": [
        "model.layers.{layer_number}.post_attention_layernorm.weight"]}
    Qwen2Bridge._OTHER_MAPPING = {**getattr(Qwen2Bridge, "_OTHER_MAPPING", {}), "input_layernorm.weight": [
        "model.layers.{layer_number}.input_layernorm.weight"]}


def _seed() -> None:
    import verl.workers.engine.megatron.transformer_impl as ti

    original = ti.set_random_seed

    def set_random_seed(seed):
        original(seed)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    ti.set_random_seed = set_random_seed


def _memory_queries() -> None:
    import torch

    torch.cuda.mem_get_info = lambda *a, **k: (0, 0)
    torch.cuda.memory_reserved = lambda *a, **k: 0
    torch.cuda.max_memory_reserved = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None


def _causal_mask() -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    original = DotProductAttention.forward

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = None
        return original(self, query, key, value, attention_mask, *args, **kwargs)

    DotProductAttention.forward = forward
