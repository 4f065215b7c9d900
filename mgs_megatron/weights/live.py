"""A live (TP/PP-sharded) Megatron model's weights to and from files: the canonical format and HF directories.

Every rank calls these together. Loading reads (mmap) only this rank's tensors, pads the vocab for its TP size
and slices its shard; saving streams full tensors to global rank 0, which writes them atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.convert.canonical import DEFAULT_SHARD_BYTES, read_model_config, write_canonical
from mgs_megatron.convert.io import SafetensorsDir, atomic_dir, copy_side_files, write_sharded
from mgs_megatron.convert.torch_dist import is_torch_dist
from mgs_megatron.errors import ConfigError, ConversionError
from mgs_megatron.megatron.state import load_full_state_dict, named_global_parameters, unwrap
from mgs_megatron.megatron.stream import iter_canonical, iter_hf_weights
from mgs_megatron.models import ModelConfig
from mgs_megatron.models.mapping import pad_vocab
from mgs_megatron.models.tensor_map import VOCAB, local_name

_VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def check_model_matches(chunks, cfg: ModelConfig) -> None:
    """ConfigError when the live model's shape differs from the checkpoint's ModelConfig."""
    tc = unwrap(chunks[0]).config
    got = dict(num_layers=tc.num_layers, hidden_size=tc.hidden_size, num_attention_heads=tc.num_attention_heads,
               num_query_groups=tc.num_query_groups, kv_channels=tc.kv_channels, ffn_hidden_size=tc.ffn_hidden_size)
    want = dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.head_dim,
                ffn_hidden_size=cfg.intermediate_size)
    for k in want:
        if got[k] != want[k]:
            raise ConfigError(f"checkpoint has {k}={want[k]} but the model was built with {k}={got[k]}")


@torch.no_grad()
def load_weights(chunks: Sequence[torch.nn.Module], path) -> Optional[ModelConfig]:
    """Load a canonical checkpoint, or a Megatron-LM torch_dist one (weights/torch_dist.py), written at any TP/PP
    into this rank's model chunks; every rank calls it.

    Accepts local or TE norm names on the model side; returns the checkpoint's ModelConfig (None for a torch_dist
    checkpoint that mgs_megatron did not write).
    """
    if is_torch_dist(path):
        from mgs_megatron.weights.torch_dist import load_torch_dist

        return load_torch_dist(chunks, path)[1]
    path = Path(path)
    cfg = read_model_config(path)
    check_model_matches(chunks, cfg)
    src = SafetensorsDir(path)
    state = {}
    for name, p, model in named_global_parameters(chunks):
        key = local_name(name)
        if key == "output_layer.weight" and model.share_embeddings_and_output_weights:
            key = name = "embedding.word_embeddings.weight"
        if key not in src:
            raise ConversionError(f"tensor {key!r} (parameter {name!r}) missing from checkpoint {str(path)!r}")
        t = src.get(key)
        if key in _VOCAB_TENSORS:
            tp_full = p.shape[0] * (model.config.tensor_model_parallel_size if p.tensor_model_parallel else 1)
            t = pad_vocab(t, tp_full)
        state[name] = t.to(p.dtype)
    load_full_state_dict(chunks, state)
    return cfg


def _rank0_writes(stream, write) -> None:
    """Global rank 0 runs `write(stream)`; the other ranks drive the stream's collectives; all meet at a barrier."""
    if dist.is_initialized() and dist.get_rank() != 0:
        for _ in stream:
            pass
        dist.barrier()
        return
    try:
        write(stream)
    finally:
        if dist.is_initialized():
            dist.barrier()


def save_weights(chunks: Sequence[torch.nn.Module], cfg: ModelConfig, path, *, hf_config: Optional[dict] = None,
                 hf_side_dir=None, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a live model (any TP/PP) as a canonical checkpoint; global rank 0 writes."""
    def write(stream):
        with atomic_dir(path, overwrite) as tmp:
            tensors = ((tm.mcore, full[: cfg.vocab_size] if tm.kind == VOCAB else full) for tm, full in stream)
            write_canonical(tmp, cfg, tensors, hf_config=hf_config, hf_side_dir=hf_side_dir,
                            max_shard_bytes=max_shard_bytes)

    _rank0_writes(iter_canonical(chunks, cfg, all_ranks=False), write)


def export_hf(chunks: Sequence[torch.nn.Module], cfg: ModelConfig, path, *, hf_config: dict,
              hf_side_dir=None, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a live model straight to an HF directory (streaming exporter; global rank 0 writes)."""
    def write(groups):
        with atomic_dir(path, overwrite) as tmp:
            write_sharded(tmp, (item for g in groups for item in g), max_shard_bytes)
            if hf_side_dir is not None:
                copy_side_files(Path(hf_side_dir), tmp)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))

    _rank0_writes(iter_hf_weights(chunks, cfg, max_bytes=max_shard_bytes, all_ranks=False), write)


__all__ = ["check_model_matches", "export_hf", "load_weights", "save_weights"]
