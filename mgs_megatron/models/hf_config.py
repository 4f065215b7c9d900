"""Reading Hugging Face config.json dicts: the fields every supported architecture reads the same way."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from mgs_megatron.errors import ConfigError
from mgs_megatron.models.config import ModelConfig, RopeScaling


def hf_config_dict(hf_config: Any) -> dict:
    """A config.json dict from a dict or a transformers PretrainedConfig."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConfigError(f"hf_config: expected a dict or a transformers config, got {type(hf_config).__name__}")


def require(hf: dict, field: str):
    if hf.get(field) is None:
        raise ConfigError(f"HF config field {field!r} is missing (model_type={hf.get('model_type')!r})")
    return hf[field]


def read_rope(hf: dict) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, llama3 scaling) from transformers-5 `rope_parameters` or older `rope_theta` / `rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" not in params and len(params) and \
            all(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError("rope_parameters: per-layer-type rope parameters are not supported")
    if isinstance(params, Mapping):
        theta, scaling, where = params.get("rope_theta", hf.get("rope_theta")), params, "rope_parameters"
    else:
        theta, scaling, where = hf.get("rope_theta"), hf.get("rope_scaling") or {}, "rope_scaling"
    if theta is None:
        raise ConfigError("HF config field 'rope_theta' (or rope_parameters.rope_theta) is missing")
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"{where}.rope_type={rope_type!r} is not supported (supported: 'default', 'llama3')")
    fields = {}
    for f in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if scaling.get(f) is None:
            raise ConfigError(f"{where}.{f} is missing for rope_type='llama3'")
        fields[f] = scaling[f]
    return float(theta), RopeScaling(factor=float(fields["factor"]), low_freq_factor=float(fields["low_freq_factor"]),
                                     high_freq_factor=float(fields["high_freq_factor"]),
                                     original_max_position_embeddings=int(fields["original_max_position_embeddings"]))


def reject(hf: dict, field: str, architecture: str, why: str = "") -> None:
    """ConfigError if an HF config sets a feature this mapping does not implement."""
    if hf.get(field):
        raise ConfigError(f"{field}={hf[field]!r} is not supported for {architecture}" + (f" ({why})" if why else ""))


def common_fields(hf: dict, architecture: str, head_dim: int, **extra) -> ModelConfig:
    """The ModelConfig every supported architecture reads the same way (gated SiLU MLP, RMSNorm, rope)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu': gated SiLU MLP)")
    theta, scaling = read_rope(hf)
    heads = int(require(hf, "num_attention_heads"))
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(require(hf, "vocab_size")),
        hidden_size=int(require(hf, "hidden_size")),
        intermediate_size=int(require(hf, "intermediate_size")),
        num_layers=int(require(hf, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **extra,
    )


def explicit_head_dim(hf: dict) -> int:
    """head_dim from the config, or hidden_size / num_attention_heads when absent (Llama, Qwen3, Mistral)."""
    return int(hf.get("head_dim") or int(require(hf, "hidden_size")) // int(require(hf, "num_attention_heads")))


__all__ = ["common_fields", "explicit_head_dim", "hf_config_dict", "read_rope", "reject", "require"]
