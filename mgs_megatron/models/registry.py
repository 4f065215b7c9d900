"""Architecture registry: HF `model_type` / `architectures` -> the file that parses its config and lists its
tensors. Adding an architecture = one file (config parsing + tensor map) and one line in `_BUILTIN` below."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mgs_megatron.errors import ConfigError


def _no_extra_rules(cfg) -> None:
    return None


@dataclass(frozen=True)
class Architecture:
    """One supported architecture.

    Args:
        name: ModelConfig.architecture.
        model_types: HF config `model_type` values it reads.
        hf_classes: HF `architectures` entries (e.g. "LlamaForCausalLM"), the fallback lookup.
        parse_config: HF config dict -> ModelConfig (ConfigError naming the field it cannot support).
        layer_tensors: (ModelConfig, layer index) -> that layer's TensorMaps in Megatron parameter order.
        check: extra shape rules of the architecture, run by ModelConfig (e.g. Qwen2's head_dim).
    """

    name: str
    model_types: tuple[str, ...]
    hf_classes: tuple[str, ...]
    parse_config: Callable[[dict], Any]
    layer_tensors: Callable[[Any, int], list]
    check: Callable[[Any], None] = field(default=_no_extra_rules)


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add an architecture; a name, model_type or HF class registered twice is an error."""
    if arch.name in ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    for other in ARCHITECTURES.values():
        clash = set(arch.model_types) & set(other.model_types) or set(arch.hf_classes) & set(other.hf_classes)
        if clash:
            raise ValueError(f"architecture {arch.name!r}: {sorted(clash)} already belong to {other.name!r}")
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture_for(hf: dict) -> Architecture:
    """The architecture of an HF config, by `model_type` and by `architectures`; both must agree when both are
    known (a Qwen2 class under model_type 'mistral' is a broken config, not a guess to make)."""
    model_type, classes = hf.get("model_type"), list(hf.get("architectures") or ())
    by_type = next((a for a in ARCHITECTURES.values() if model_type in a.model_types), None)
    by_class = next((a for c in classes for a in ARCHITECTURES.values() if c in a.hf_classes), None)
    if by_type is not None and by_class is not None and by_type is not by_class:
        raise ConfigError(f"HF config: model_type={model_type!r} is {by_type.name!r} but architectures={classes} "
                          f"is {by_class.name!r}; fix one of them")
    if by_type is None and by_class is None:
        types = sorted(t for a in ARCHITECTURES.values() for t in a.model_types)
        names = sorted(c for a in ARCHITECTURES.values() for c in a.hf_classes)
        raise ConfigError(f"model_type={model_type!r} / architectures={classes!r} is not supported (supported "
                          f"model_type: {types}, architectures: {names})")
    return by_type or by_class


def model_config_from_hf(hf_config: Any):
    """HF config (dict from config.json, or a transformers config object) -> ModelConfig."""
    from mgs_megatron.models.hf_config import hf_config_dict

    hf = hf_config_dict(hf_config)
    return architecture_for(hf).parse_config(hf)


def _register_builtin() -> None:
    from mgs_megatron.models import llama, mistral, qwen2, qwen3

    _BUILTIN = (llama.ARCHITECTURE, qwen2.ARCHITECTURE, qwen3.ARCHITECTURE, mistral.ARCHITECTURE)
    for arch in _BUILTIN:
        register_architecture(arch)


_register_builtin()

__all__ = ["ARCHITECTURES", "Architecture", "architecture_for", "model_config_from_hf", "register_architecture"]
