"""Megatron-LM's torch_dist checkpoints, file level and single-process (torch.distributed.checkpoint only, no
process group, no Megatron): the directory layout, the key layout, a reader and a writer.

    <root>/latest_checkpointed_iteration.txt      "<N>" (or "release"): the tracker, written LAST
    <root>/iter_<N:07d>/.metadata                 torch DCP metadata: every key, its global shape and chunks
    <root>/iter_<N:07d>/__<rank>_<i>.distcp       the data
    <root>/iter_<N:07d>/metadata.json             {"sharded_backend": "torch_dist", ...}: marks a complete save
    <root>/iter_<N:07d>/common.pt                 the common state on megatron-core <= 0.16 (0.19 keeps it in the
                                                  .distcp files as the object `common_state`); we write both

Keys (Megatron-LM's, the same for the local and the Transformer-Engine layer specs): the layers' tensors are
STACKED along a leading layer axis, `decoder.layers.self_attention.linear_qkv.weight` [L, rows, hidden]; norms
use the TE names (`...linear_qkv.layer_norm_weight`, `...linear_fc1.layer_norm_weight`); the vocabulary rows are
padded (Megatron-LM: to a multiple of make_vocab_size_divisible_by x TP; Megatron's loaders accept any padding for
the embedding and output layer). The common state holds `args` (an argparse.Namespace), `iteration` and
`checkpoint_version`.

Writes go to a temp directory that is renamed into place; the tracker is written after the rename, so a
half-written `iter_*` directory is never the one a loader picks. Reading and writing the files:
torch_dist_io.py; HF conversion: torch_dist_convert.py; a live model: weights/torch_dist.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from mgs_megatron.errors import ConversionError
from mgs_megatron.models import ModelConfig
from mgs_megatron.models.tensor_map import te_name

TRACKER = "latest_checkpointed_iteration.txt"
DONE = "metadata.json"  # Megatron writes it after the data (and we rename the directory after that)
COMMON_KEY = "common_state/shard_0_1"
CHECKPOINT_VERSION = 3.0
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Megatron's linear layers carry an `_extra_state` object per layer (None without FP8); the TE spec adds one for
# core attention. Written as None so that loaders of either spec find what they ask for.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                       "mlp.linear_fc2", "self_attention.core_attention")


def iter_name(iteration: Union[int, str]) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


# ------------------------------------------------------------------------------------------------ directories
def is_torch_dist(path) -> bool:
    """A Megatron-LM checkpoint root (has the tracker) or one of its `iter_*` directories."""
    path = Path(path)
    return (path / TRACKER).is_file() or _backend(path) is not None


def _backend(iter_dir: Path) -> Optional[str]:
    f = iter_dir / DONE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("sharded_backend")
    except (ValueError, AttributeError):
        return None


def resolve_iteration(path) -> Path:
    """The complete `iter_*` directory a loader should read: the one the tracker names, or `path` itself.

    ConversionError (naming the directory) when it is missing, half-written (no metadata.json: an interrupted
    save) or in another format than torch_dist."""
    path = Path(path)
    if (path / TRACKER).is_file():
        value = (path / TRACKER).read_text().strip()
        if value != "release" and not value.isdigit():
            raise ConversionError(f"{str(path / TRACKER)!r} holds {value!r}, not an iteration number")
        path = path / iter_name(value if value == "release" else int(value))
    if not path.is_dir():
        raise ConversionError(f"Megatron-LM checkpoint directory {str(path)!r} does not exist (the tracker names it)")
    backend = _backend(path)
    if backend is None:
        legacy = next(path.glob("mp_rank_*"), None)
        why = ("it is in the legacy per-rank torch format (mp_rank_*/), not torch_dist" if legacy else
               f"it has no {DONE}: the save that wrote it did not finish")
        raise ConversionError(f"checkpoint {str(path)!r} cannot be loaded: {why}")
    if backend != "torch_dist":
        raise ConversionError(f"checkpoint {str(path)!r} uses sharded_backend={backend!r}; only torch_dist is read")
    return path


def write_tracker(root: Path, iteration: Union[int, str]) -> None:
    part = root / f".{TRACKER}.part"
    part.write_text(str(iteration))
    os.replace(part, root / TRACKER)


def finish_iteration(root: Path, tmp: Path, iteration: int) -> Path:
    """Rename a completely written temp directory to `iter_<N>` (replacing an older one atomically), then point
    the tracker at it. A crash before the rename leaves the previous tracker and directories untouched."""
    final = root / iter_name(iteration)
    if final.exists():  # move the old one aside first, so that a crash never leaves neither
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=root))
        os.replace(final, old / "x")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    write_tracker(root, iteration)
    return final


# ------------------------------------------------------------------------------------------------ key layout
@dataclass(frozen=True)
class Key:
    """Where a canonical tensor lives in a torch_dist checkpoint: its key and, for layer tensors, its index along
    the stacked layer axis."""

    key: str
    layer: Optional[int] = None


def key_of(canonical: str) -> Key:
    """`decoder.layers.3.input_layernorm.weight` -> Key('decoder.layers.self_attention.linear_qkv.layer_norm_weight',
    3); non-layer tensors keep their names."""
    m = _LAYER.match(te_name(canonical))
    if not m:
        return Key(canonical)
    return Key(f"decoder.layers.{m.group(2)}", int(m.group(1)))


def padded_vocab(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron-LM's rule (megatron/training/vocab_utils.py): a multiple of divisible_by x TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def megatron_lm_args(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, padded_vocab_size: int, iteration: int,
                     hf_config: Optional[dict] = None, **extra) -> argparse.Namespace:
    """The `args` a Megatron-LM checkpoint carries: what `load_checkpoint` checks (num_layers, hidden_size,
    num_attention_heads, add_position_embedding), what tells it there is no RNG or optimizer state to load, the
    model's shape in Megatron-LM's argument names, and ours (`mgs_model_config`, `mgs_hf_config`) for conversion."""
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        group_query_attention=cfg.num_key_value_heads != cfg.num_attention_heads, kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, position_embedding_type="rope",
        add_position_embedding=False, rotary_base=cfg.rope_theta, use_rope_scaling=cfg.rope_scaling is not None,
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, swiglu=True, add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias, qk_layernorm=cfg.qk_norm,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings, padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        ckpt_format="torch_dist", use_dist_ckpt=True, no_save_rng=True, no_save_optim=True, iteration=iteration,
        consumed_train_samples=0, consumed_valid_samples=0, mgs_model_config=cfg.to_dict(), mgs_hf_config=hf_config,
        **extra)


def common_state(args: argparse.Namespace, iteration: int) -> dict:
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            "num_floating_point_operations_so_far": 0}


__all__ = ["CHECKPOINT_VERSION", "COMMON_KEY", "DONE", "EXTRA_STATE_MODULES", "Key", "TRACKER", "common_state",
           "finish_iteration", "is_torch_dist", "iter_name", "key_of", "megatron_lm_args", "padded_vocab",
           "resolve_iteration", "write_tracker"]
