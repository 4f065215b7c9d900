"""Architecture registry: HF `model_type` / `architectures` -> the adapter that builds a ModelConfig."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from mgs_megatron.megatron.model import ConfigError, ModelConfig
from mgs_megatron.convert import llama, qwen2, qwen3
from mgs_megatron.convert.base import hf_config_dict

ADAPTERS: tuple[ModuleType, ...] = (llama, qwen2, qwen3)
_BY_MODEL_TYPE = {t: a for a in ADAPTERS for t in a.MODEL_TYPES}
_BY_ARCHITECTURE = {t: a for a in ADAPTERS for t in a.ARCHITECTURES}


def adapter_for(hf: dict) -> ModuleType:
    """Look up by model_type first, then by the first known entry of `architectures`."""
    model_type = hf.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    for arch in hf.get("architectures") or ():
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    raise ConfigError(f"model_type={model_type!r} / architectures={hf.get('architectures')!r} is not supported "
                      f"(supported model_type: {sorted(_BY_MODEL_TYPE)}, architectures: {sorted(_BY_ARCHITECTURE)})")


def model_config_from_hf(hf_config: Any) -> ModelConfig:
    """HF config (dict from config.json, or a transformers config object) -> ModelConfig."""
    hf = hf_config_dict(hf_config)
    return adapter_for(hf).model_config(hf)
