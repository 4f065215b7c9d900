"""The tensor map: every canonical Megatron tensor of a model and the HF tensor(s) it is made of, with shapes.

Canonical Megatron form (see megatron/state.py): global layer numbers, full tensors, linear_fc1 = [gate; up],
linear_qkv rows interleaved per query group as [q heads of the group, k head, v head] (each head_dim rows), norms
under the LOCAL-spec names (`input_layernorm`, `pre_mlp_layernorm`; `te_name` gives the Transformer-Engine ones).
Every name is written once, in a `LayerTensors` block; an architecture lists the blocks its layers have, and HF
shapes are read off the map (`hf_shapes`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from mgs_megatron.models.config import ModelConfig

# kinds of TensorMap: a plain copy, a vocabulary-sized tensor (padded for TP), fused q/k/v, fused gate/up
COPY, VOCAB, QKV, GATE_UP = "copy", "vocab", "qkv", "gate_up"

# LOCAL-spec name suffix -> TE-spec name suffix (norms fused into the following linear)
_TE_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class TensorMap:
    """One canonical Megatron tensor and the HF tensors it is made of (several when fused), with their shapes."""

    mcore: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    kind: str = COPY
    layer: Optional[int] = None

    @property
    def mcore_shape(self) -> tuple[int, ...]:
        """The fused tensor's shape: HF tensors stacked along rows."""
        return (sum(s[0] for s in self.shapes),) + self.shapes[0][1:]


class LayerTensors:
    """The building blocks of decoder layer `i`'s tensor map, in Megatron's parameter order."""

    def __init__(self, cfg: ModelConfig, i: int):
        self.i, self.mcore, self.hf = i, f"decoder.layers.{i}.", f"model.layers.{i}."
        self.hidden, self.ffn, self.head_dim = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        self.q_rows = cfg.num_attention_heads * cfg.head_dim
        self.kv_rows = cfg.num_key_value_heads * cfg.head_dim

    def _copy(self, mcore: str, hf: str, shape: tuple[int, ...]) -> TensorMap:
        return TensorMap(self.mcore + mcore, (self.hf + hf,), (shape,), COPY, self.i)

    def _qkv(self, part: str, cols: tuple[int, ...]) -> TensorMap:
        rows = (self.q_rows, self.kv_rows, self.kv_rows)
        return TensorMap(self.mcore + f"self_attention.linear_qkv.{part}",
                         tuple(f"{self.hf}self_attn.{p}_proj.{part}" for p in "qkv"),
                         tuple((r,) + cols for r in rows), QKV, self.i)

    def input_norm(self) -> TensorMap:
        return self._copy("input_layernorm.weight", "input_layernorm.weight", (self.hidden,))

    def qkv(self) -> TensorMap:
        return self._qkv("weight", (self.hidden,))

    def qkv_bias(self) -> TensorMap:
        return self._qkv("bias", ())

    def q_norm(self) -> TensorMap:
        return self._copy("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", (self.head_dim,))

    def k_norm(self) -> TensorMap:
        return self._copy("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", (self.head_dim,))

    def attn_out(self) -> TensorMap:
        return self._copy("self_attention.linear_proj.weight", "self_attn.o_proj.weight", (self.hidden, self.q_rows))

    def mlp_norm(self) -> TensorMap:
        return self._copy("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", (self.hidden,))

    def gate_up(self) -> TensorMap:
        shape = (self.ffn, self.hidden)
        return TensorMap(self.mcore + "mlp.linear_fc1.weight", (self.hf + "mlp.gate_proj.weight",
                                                                  self.hf + "mlp.up_proj.weight"),
                         (shape, shape), GATE_UP, self.i)

    def down(self) -> TensorMap:
        return self._copy("mlp.linear_fc2.weight", "mlp.down_proj.weight", (self.hidden, self.ffn))


@functools.lru_cache(maxsize=16)  # ModelConfig is frozen; the table is looked up once per tensor
def tensor_maps(cfg: ModelConfig) -> tuple[TensorMap, ...]:
    """Every canonical tensor in model order: embedding, layers 0.., final norm, output layer (untied only)."""
    from mgs_megatron.models.registry import ARCHITECTURES

    vocab = (cfg.vocab_size, cfg.hidden_size)
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (vocab,), VOCAB)]
    layer_tensors = ARCHITECTURES[cfg.architecture].layer_tensors
    for i in range(cfg.num_layers):
        maps += layer_tensors(cfg, i)
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), ((cfg.hidden_size,),)))
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), (vocab,), VOCAB))
    return tuple(maps)


@functools.lru_cache(maxsize=16)
def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, read off the tensor map (a shared dict: do not modify)."""
    return {n: s for tm in tensor_maps(cfg) for n, s in zip(tm.hf, tm.shapes)}


def te_name(mcore: str) -> str:
    """The Transformer-Engine spec's name of a canonical (local-spec) tensor."""
    for local, te in _TE_NORMS.items():
        if mcore.endswith("." + local):
            return mcore[: -len(local)] + te
    return mcore


def local_name(mcore: str) -> str:
    """The canonical (local-spec) name of a local- or TE-spec tensor name."""
    for local, te in _TE_NORMS.items():
        if mcore.endswith("." + te):
            return mcore[: -len(te)] + local
    return mcore


def uses_te_norms(param_names) -> bool:
    """True when the model's parameter names are TE-spec (norms fused into linear_qkv / linear_fc1)."""
    return any(n.endswith("layer_norm_weight") for n in param_names)


__all__ = ["COPY", "GATE_UP", "QKV", "VOCAB", "LayerTensors", "TensorMap", "hf_shapes", "local_name", "te_name",
           "tensor_maps", "uses_te_norms"]
