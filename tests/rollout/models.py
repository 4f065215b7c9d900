"""Tiny HF models for rollout tests: the conversion tests' architectures (tests/convert/models.py) with the toy
tokenizer's vocabulary (512) and head_dim 32 (a vLLM CPU attention size). Two seeds per model: vLLM starts from
seed A's HF checkpoint, Megatron loads seed B's, so a passing logprob check proves the sync happened."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mgs_megatron.testing.tiny import randomize_hf_params
from tests.convert import models as convert_models

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
VOCAB = 512


def build(name: str, seed: int):
    import transformers

    cls_name, kwargs = convert_models.specs()[name]
    kwargs = dict(kwargs, vocab_size=VOCAB, max_position_embeddings=256)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    randomize_hf_params(model)
    return model


def save(name: str, seed: int, out: Path) -> Path:
    build(name, seed).save_pretrained(out)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    return out


def prepare(name: str, root: Path) -> tuple[str, str]:
    """(HF dir with seed 0 -> the engine's start weights, Megatron checkpoint of seed 1 -> the trained model)."""
    from mgs_megatron.convert import hf_to_mcore_checkpoint

    engine_dir = save(name, 0, root / f"{name}-engine")
    other = save(name, 1, root / f"{name}-seed1")
    mcore = root / f"{name}-mcore"
    hf_to_mcore_checkpoint(other, mcore, progress=False)
    return str(engine_dir), str(mcore)


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 3?"}]
PROMPTS = [CHAT, "The quick brown fox", [5, 17, 42, 99, 300, 7]]
