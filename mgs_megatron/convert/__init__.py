"""Checkpoint files, model-free and single-process: HF directories <-> the canonical Megatron format.

  io          atomic output directories, sharded safetensors reading / writing, HF side files
  canonical   the "mgs-canonical-v1" format (full tensors, any TP/PP loads it) and HF <-> canonical conversion

The tensor mapping itself is `mgs_megatron.models` (per architecture); moving weights between these files and a
live, sharded Megatron model is `mgs_megatron.weights`.
"""

from mgs_megatron.convert.canonical import (
                                            FORMAT,
                                            META,
                                            hf_to_mcore_checkpoint,
                                            is_canonical,
                                            mcore_to_hf_checkpoint,
                                            read_metadata,
                                            read_model_config,
)
from mgs_megatron.convert.io import SafetensorsDir, atomic_dir

__all__ = ["FORMAT", "META", "SafetensorsDir", "atomic_dir", "hf_to_mcore_checkpoint", "is_canonical",
           "mcore_to_hf_checkpoint", "read_metadata", "read_model_config"]
