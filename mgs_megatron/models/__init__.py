"""Architecture-neutral model descriptions (plain torch; imports neither Megatron nor file formats).

  config       ModelConfig, RopeScaling: what an HF config says about the model
  registry     the supported architectures; `model_config_from_hf`
  llama, qwen2, qwen3, mistral
               one file per architecture: its HF config parsing and its layers' tensor map
  tensor_map   TensorMap, the per-layer building blocks, `tensor_maps(cfg)`, `hf_shapes(cfg)`
  mapping      HF <-> canonical Megatron tensors, name checks, HF row blocks of a TP shard
"""

from mgs_megatron.models.config import ModelConfig, RopeScaling
from mgs_megatron.models.registry import ARCHITECTURES, Architecture, model_config_from_hf, register_architecture
from mgs_megatron.models.tensor_map import TensorMap, hf_shapes, tensor_maps

__all__ = ["ARCHITECTURES", "Architecture", "ModelConfig", "RopeScaling", "TensorMap", "hf_shapes",
           "model_config_from_hf", "register_architecture", "tensor_maps"]
