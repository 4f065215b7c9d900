"""Checkpoints that Megatron-LM itself reads and writes (megatron.training.checkpointing on megatron-core 0.19.2),
at a different TP/PP on each side, with a vocabulary that Megatron-LM pads differently from us (101 -> 128 x TP).

  ours -> Megatron-LM   our model (TP2) saves torch_dist; Megatron-LM builds its model from its own arguments
                        (PP2) and load_checkpoint()s it: logits == Hugging Face's within 1e-5 (fp32).
  Megatron-LM -> ours   Megatron-LM's model (TP2, its own init) save_checkpoint()s; ours (PP2) loads it, and the
                        file-level converter turns it into an HF model: logits == Megatron-LM's own within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgs_megatron.testing.harness import Layout, run_distributed
from tests.convert import models
from tests.interop import mlm

pytestmark = pytest.mark.skipif(not mlm.HAS_MEGATRON_TRAINING, reason=mlm.SKIP_REASON)
VARIANTS = ("qwen2", "qwen3")  # untied + qkv bias; tied + q/k norm (head_dim != hidden / heads)
TOL = 1e-5


def _ours(cfg):
    from megatron.core import parallel_state as ps

    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model

    torch.manual_seed(321)  # not the checkpoint's weights: loading must overwrite all of them
    par = ParallelConfig(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    return [build_gpt_model(cfg, par)]


def ours_save(canonical_dirs: dict, root: str) -> None:
    from mgs_megatron.convert import read_metadata, read_model_config
    from mgs_megatron.weights import load_weights
    from mgs_megatron.weights.torch_dist import save_torch_dist

    for name, src in canonical_dirs.items():
        cfg = read_model_config(src)
        chunks = _ours(cfg)
        load_weights(chunks, src)
        save_torch_dist(chunks, cfg, Path(root) / name, iteration=3, hf_config=read_metadata(src)["hf_config"])


def mlm_load(cfgs: dict, root: str) -> dict:
    from mgs_megatron.megatron.forward import megatron_logits

    out = {}
    for name, cfg in cfgs.items():
        args = mlm.setup(cfg, str(Path(root) / name))
        model = mlm.build_model(args)
        assert mlm.load(model) == 3
        out[name] = megatron_logits([model], models.input_ids(), cfg.vocab_size)
    return out


def mlm_save(cfgs: dict, root: str) -> dict:
    from mgs_megatron.megatron.forward import megatron_logits

    out = {}
    for name, cfg in cfgs.items():
        args = mlm.setup(cfg, str(Path(root) / name))
        model = mlm.build_model(args)  # Megatron-LM's own initialisation (seeded by the harness)
        out[name] = megatron_logits([model], models.input_ids(), cfg.vocab_size)
        mlm.save(model, 7)
    return out


def ours_load(cfgs: dict, root: str) -> dict:
    from mgs_megatron.megatron.forward import megatron_logits
    from mgs_megatron.weights import load_weights

    out = {}
    for name, cfg in cfgs.items():
        chunks = _ours(cfg)
        load_weights(chunks, Path(root) / name)
        out[name] = megatron_logits(chunks, models.input_ids(), cfg.vocab_size)
    return out


def _last_stage(results):
    return next(r for r in results if any(v is not None for v in r.values()))


def test_ours_to_megatron_lm_and_back(tmp_path):
    import transformers

    from mgs_megatron.convert import hf_to_mcore_checkpoint
    from mgs_megatron.convert.torch_dist_convert import torch_dist_to_hf

    canonical, cfgs, ref = {}, {}, {}
    for name in VARIANTS:
        model = models.build(name)
        model.save_pretrained(tmp_path / "hf" / name)
        canonical[name] = str(tmp_path / "canonical" / name)
        cfgs[name] = hf_to_mcore_checkpoint(tmp_path / "hf" / name, canonical[name], progress=False)
        with torch.no_grad():
            ref[name] = model(models.input_ids()).logits.float()

    run_distributed(ours_save, Layout(tp=2), canonical, str(tmp_path / "ours"), timeout=300)
    got = _last_stage(run_distributed(mlm_load, Layout(pp=2), cfgs, str(tmp_path / "ours"), timeout=300))
    for name in VARIANTS:
        assert (got[name] - ref[name]).abs().max().item() <= TOL, name

    theirs = _last_stage(run_distributed(mlm_save, Layout(tp=2), cfgs, str(tmp_path / "mlm"), timeout=300))
    ours = _last_stage(run_distributed(ours_load, Layout(pp=2), cfgs, str(tmp_path / "mlm"), timeout=300))
    for name in VARIANTS:
        assert (ours[name] - theirs[name]).abs().max().item() <= TOL, name
        assert (ours[name] - ref[name]).abs().max().item() > 1e-2  # Megatron-LM's own weights, not the HF model's
        # the file-level converter (one process, no model) on Megatron-LM's directory: an HF model with its logits
        torch_dist_to_hf(tmp_path / "mlm" / name, tmp_path / "out" / name, hf_config_dir=tmp_path / "hf" / name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / name, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (hf(models.input_ids()).logits.float() - theirs[name]).abs().max().item() <= TOL, name
