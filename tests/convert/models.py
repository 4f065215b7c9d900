"""Tiny random HF models (saved with save_pretrained) covering every supported architecture feature."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mgs_megatron.testing.tiny import randomize_hf_params

VOCAB = 101  # odd: TP2 pads it to 102, so padding on import / stripping on export is exercised
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def specs() -> dict[str, tuple[str, dict]]:
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5)
    return {
        # Llama 3.2-style: tied embeddings + llama3 rope scaling
        "llama_tied": ("LlamaConfig", dict(common, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                           rope_parameters=dict(LLAMA3_ROPE))),
        "llama_untied": ("LlamaConfig", dict(common, hidden_size=128, intermediate_size=192, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                             rope_parameters=dict(LLAMA3_ROPE))),
        # Qwen2.5-7B-like GQA ratio 7:1, qkv bias, head_dim 32
        "qwen2": ("Qwen2Config", dict(common, hidden_size=448, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False)),
        # Mistral v0.3-style: Llama-shaped, no sliding window, explicit head_dim 32 != hidden / heads = 16
        "mistral": ("MistralConfig", dict(common, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                          sliding_window=None, rope_theta=1e6, tie_word_embeddings=False)),
        # Qwen3: q/k norm, head_dim 32 != hidden / heads = 16
        "qwen3": ("Qwen3Config", dict(common, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                      tie_word_embeddings=True)),
    }


def build(name: str, seed: int = 0):
    import transformers

    cls_name, kwargs = specs()[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    randomize_hf_params(model)
    return model


def save_all(root: Path) -> dict[str, Path]:
    out = {}
    for name in specs():
        d = root / name
        build(name).save_pretrained(d)
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "marker": name}))
        out[name] = d
    return out


def input_ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(7))
