"""Tiny model shapes and token batches for tests and smoke runs (built locally, nothing downloaded)."""

from __future__ import annotations

import torch

from mgs_megatron.megatron.model import ModelConfig

TINY_QWEN2 = ModelConfig(architecture="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=True,
                         rope_theta=1_000_000.0, max_position_embeddings=256)


def token_batches(num_sequences: int, seq_length: int, vocab_size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_sequences, seq_length + 1), generator=g)


def lm_micro_batches(tokens: torch.Tensor, micro_batch_size: int) -> list[dict]:
    """Next-token micro-batches from [n, s+1] token rows."""
    out = []
    for i in range(0, tokens.shape[0], micro_batch_size):
        rows = tokens[i:i + micro_batch_size]
        out.append({"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
                    "loss_mask": torch.ones(rows.shape[0], rows.shape[1] - 1)})
    return out


def dp_slice(rows: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    per = rows.shape[0] // dp_size
    return rows[dp_rank * per:(dp_rank + 1) * per]


@torch.no_grad()
def randomize_hf_params(model: torch.nn.Module, matrix_std: float = 0.05, vector_std: float = 0.2):
    """Random weights, and random norms / biases too (1 + noise, noise): a swapped or mis-fused 1-D tensor then
    changes the output, which HF's default init (norms = 1, biases = 0) would hide."""
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(1.0 + vector_std * torch.randn_like(p) if "norm" in name else vector_std * torch.randn_like(p))
        else:
            p.normal_(0.0, matrix_std)
    return model
