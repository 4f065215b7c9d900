"""HF <-> Megatron conversion for Llama 3.x, Qwen2/2.5 and Qwen3.

Layers (each small and model-free unless noted):
  registry / llama / qwen2 / qwen3   HF config -> ModelConfig (`model_config_from_hf`), keyed by model_type /
                                     architectures; ConfigError names the offending field.
  base / mapping                     the explicit tensor table (`tensor_maps`), qkv / gate-up fusing, shape checks,
                                     `hf_module_blocks` (HF row blocks of a TP-local Megatron shard).
  stream (live model)                `iter_canonical`, `iter_hf_weights`: bounded groups of full HF tensors.
  checkpoint                         files: `hf_to_mcore_checkpoint`, `mcore_to_hf_checkpoint`, `load_checkpoint`,
                                     `save_checkpoint`, `export_hf` (atomic directory writes).
  forward                            `megatron_logits` (pipeline schedule + TP gather) for checks.
"""

from mgs_megatron.convert.base import TensorMap, tensor_maps, uses_te_norms
from mgs_megatron.convert.checkpoint import (export_hf, hf_to_mcore_checkpoint, load_checkpoint,
                                             mcore_to_hf_checkpoint, read_metadata, save_checkpoint)
from mgs_megatron.convert.mapping import (ConversionError, convert_hf_state_dict, convert_mcore_state_dict,
                                          hf_module_blocks, hf_shapes)
from mgs_megatron.convert.registry import model_config_from_hf
from mgs_megatron.convert.stream import iter_canonical, iter_hf_weights

__all__ = ["ConversionError", "TensorMap", "convert_hf_state_dict", "convert_mcore_state_dict", "export_hf",
           "hf_module_blocks", "hf_shapes", "hf_to_mcore_checkpoint", "iter_canonical", "iter_hf_weights",
           "load_checkpoint", "mcore_to_hf_checkpoint", "model_config_from_hf", "read_metadata", "save_checkpoint",
           "tensor_maps", "uses_te_norms"]
