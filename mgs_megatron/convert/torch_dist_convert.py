"""HF directories <-> Megatron-LM torch_dist checkpoints, file to file, in one process without a model.

    hf_to_torch_dist(HF_DIR, ROOT)            -> ROOT/latest_checkpointed_iteration.txt + ROOT/iter_0000000/
    torch_dist_to_hf(ROOT, HF_OUT[, hf_config_dir=HF_DIR])

Both stream: one layer of one tensor in memory at a time. A checkpoint written by mgs_megatron carries its
ModelConfig and HF config; one written by Megatron-LM, verl or slime needs the HF config of the model
(`hf_config_dir`: its config.json, tokenizer and generation files are copied to the output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from mgs_megatron.convert.canonical import open_hf
from mgs_megatron.convert.io import SafetensorsDir, atomic_dir, copy_side_files, read_config, write_sharded
from mgs_megatron.convert.torch_dist import common_state, key_of, megatron_lm_args, padded_vocab
from mgs_megatron.convert.torch_dist_io import Chunk, TorchDistReader, write_iteration
from mgs_megatron.errors import ConversionError
from mgs_megatron.models import ModelConfig, TensorMap, model_config_from_hf, tensor_maps
from mgs_megatron.models.mapping import hf_to_mcore, mcore_to_hf, pad_vocab
from mgs_megatron.models.tensor_map import VOCAB


# ------------------------------------------------------------------------------------------------ HF -> torch_dist
def hf_chunks(cfg: ModelConfig, src: SafetensorsDir, vocab_rows: int) -> list[Chunk]:
    """One chunk per canonical tensor (per layer for the stacked ones), made from the HF tensors when written."""
    chunks = []
    for tm in tensor_maps(cfg):
        k = key_of(tm.mcore)
        dtype = src.get(tm.hf[0]).dtype
        shape = (vocab_rows,) + tm.mcore_shape[1:] if tm.kind == VOCAB else tm.mcore_shape

        def make(tm=tm, layer=k.layer):
            t = hf_to_mcore(tm, src.get, cfg)
            t = pad_vocab(t, vocab_rows) if tm.kind == VOCAB else t
            return t if layer is None else t.unsqueeze(0)

        if k.layer is None:
            chunks.append(Chunk(k.key, (0,) * len(shape), shape, shape, dtype, make))
        else:
            chunks.append(Chunk(k.key, (k.layer,) + (0,) * len(shape), (1,) + shape, (cfg.num_layers,) + shape,
                                dtype, make))
    return chunks


def hf_to_torch_dist(hf_dir, root, *, iteration: int = 0, tp: int = 1, make_vocab_size_divisible_by: int = 128,
                     overwrite: bool = False) -> ModelConfig:
    """HF model directory -> Megatron-LM torch_dist checkpoint (vocab padded as Megatron-LM pads it for `tp`)."""
    hf_dir = Path(hf_dir)
    hf_config, cfg, src = open_hf(hf_dir)
    rows = padded_vocab(cfg.vocab_size, make_vocab_size_divisible_by, tp)
    args = megatron_lm_args(cfg, tp=tp, padded_vocab_size=rows, iteration=iteration, hf_config=hf_config)
    args.make_vocab_size_divisible_by = make_vocab_size_divisible_by

    def side_files(tmp: Path) -> None:
        (tmp / "hf").mkdir()
        copy_side_files(hf_dir, tmp / "hf")

    write_iteration(root, iteration, hf_chunks(cfg, src, rows), common_state(args, iteration),
                    extra_state_layers=cfg.num_layers, side_files=side_files, overwrite=overwrite)
    return cfg


# ------------------------------------------------------------------------------------------------ torch_dist -> HF
def checkpoint_model_config(reader: TorchDistReader, hf_config_dir=None) -> tuple[ModelConfig, Optional[dict]]:
    """(ModelConfig, HF config dict) of a torch_dist checkpoint: from `hf_config_dir` when given, else what
    mgs_megatron stored in its args."""
    if hf_config_dir is not None:
        hf = read_config(Path(hf_config_dir))
        return model_config_from_hf(hf), hf
    cfg = reader.model_config()
    if cfg is None:
        raise ConversionError(f"{str(reader.path)!r} was not written by mgs_megatron (its args carry no model "
                              f"config): give the HF config directory of the model (--hf-config DIR)")
    return cfg, getattr(reader.args(), "mgs_hf_config", None)


def check_torch_dist_shapes(reader: TorchDistReader, cfg: ModelConfig) -> None:
    """ConversionError naming the first tensor whose key or global shape does not fit `cfg` (vocab rows may be
    padded, never fewer)."""
    seen = set()
    for tm in tensor_maps(cfg):
        k = key_of(tm.mcore)
        if k.key in seen:
            continue
        seen.add(k.key)
        if k.key not in reader:
            raise ConversionError(f"tensor {k.key!r} missing from torch_dist checkpoint {str(reader.path)!r} "
                                  f"(architecture {cfg.architecture!r})")
        got = reader.shape(k.key)
        want = tm.mcore_shape if k.layer is None else (cfg.num_layers,) + tm.mcore_shape
        ok = got[1:] == want[1:] and got[0] >= want[0] if tm.kind == VOCAB else got == want
        if not ok:
            raise ConversionError(f"tensor {k.key!r} in {str(reader.path)!r} has shape {got}, expected {want}"
                                  + (" (rows may be padded)" if tm.kind == VOCAB else ""))


def iter_canonical_files(reader: TorchDistReader, cfg: ModelConfig) -> Iterator[tuple[TensorMap, torch.Tensor]]:
    """(TensorMap, canonical tensor with the vocabulary unpadded), one layer of one tensor at a time."""
    check_torch_dist_shapes(reader, cfg)
    for tm in tensor_maps(cfg):
        t = reader.get_canonical(tm.mcore)
        yield tm, t[: cfg.vocab_size] if tm.kind == VOCAB else t


def torch_dist_to_hf(root, out_dir, *, hf_config_dir=None, overwrite: bool = False,
                     max_shard_bytes: int = 2 << 30) -> ModelConfig:
    """Megatron-LM torch_dist checkpoint (root with the tracker, or an iter_* directory) -> HF directory."""
    reader = TorchDistReader(root)
    cfg, hf_config = checkpoint_model_config(reader, hf_config_dir)
    if hf_config is None:
        raise ConversionError(f"{str(reader.path)!r} has no HF config to write config.json from: pass --hf-config DIR")
    side = Path(hf_config_dir) if hf_config_dir is not None else reader.path / "hf"
    with atomic_dir(out_dir, overwrite) as tmp:
        write_sharded(tmp, (item for tm, t in iter_canonical_files(reader, cfg) for item in mcore_to_hf(tm, t, cfg)),
                      max_shard_bytes)
        if side.is_dir():
            copy_side_files(side, tmp)
        if not (tmp / "config.json").exists():
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    return cfg


__all__ = ["check_torch_dist_shapes", "checkpoint_model_config", "hf_chunks", "hf_to_torch_dist",
           "iter_canonical_files", "torch_dist_to_hf"]
