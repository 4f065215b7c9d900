"""ModelConfig: what a Hugging Face config says about a Llama-family decoder, architecture-neutral.

Each architecture's file (llama.py, qwen2.py, ...) parses an HF config into it; `megatron/` builds a GPTModel from
it and `convert/` maps tensors with it. It imports nothing of either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from mgs_megatron.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.x ("llama3") rope scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer with RMSNorm, rotary embeddings and a gated SiLU MLP.

    Args:
        architecture: a registered architecture name (``models.registry.ARCHITECTURES``): "llama", "qwen2", ...
        vocab_size: the real (unpadded) vocabulary size.
        head_dim: per-head size (may differ from hidden_size / num_attention_heads, e.g. Qwen3).
        qkv_bias: q/k/v projections carry a bias (Qwen2).
        qk_norm: per-head RMSNorm on q and k (Qwen3).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self):
        from mgs_megatron.models.registry import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture={self.architecture!r} is not supported (supported: "
                              f"{sorted(ARCHITECTURES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads={self.num_key_value_heads}")
        ARCHITECTURES[self.architecture].check(self)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


__all__ = ["ModelConfig", "RopeScaling"]
