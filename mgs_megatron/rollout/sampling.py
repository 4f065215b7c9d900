"""Next-token sampling for token-by-token generation, vectorised on the logits' device and reproducible.

    tokens = sample_next(logits, temperature=T, top_p=p, seeds=seeds, step=t)     # logits [b, V] -> [b]

Gumbel-max: argmax(z / T + G) with G = -log(-log(U)) is a draw from softmax(z / T). U comes from a counter-based
hash of (the row's seed, the decoding step, the vocabulary index): no generator objects, no per-row kernel launches
or host synchronisation, and the draw depends only on those three numbers, so results are the same at every
parallel layout, batch composition and resume point. top_p keeps the smallest set of most likely tokens whose
probability reaches p (the first token always stays); temperature 0 is greedy.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of int64 values in [0, 2^32) ('lowbias32'); products stay below 2^63."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def counter_uniform(seeds: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """U(0, 1) [b, n], float64: a hash of (seeds[i], step, j), on seeds' device."""
    s = seeds.to(torch.int64).view(-1, 1)
    h = _mix32(_mix32(s & _M32) ^ _mix32((s >> 32) & _M32) ^ (step & _M32))
    j = torch.arange(n, dtype=torch.int64, device=seeds.device).view(1, -1)
    bits = _mix32(_mix32(h ^ j) ^ 0x9E3779B9) * (1 << 21) + (_mix32(h ^ (j + (1 << 31))) >> 11)  # 53 bits
    return (bits.to(torch.float64) + 0.5) / float(1 << 53)


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, seeds: torch.Tensor,
                step: int) -> torch.Tensor:
    """One token per row of logits [b, V] (any float dtype); see the module docstring."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.to(torch.float64) / temperature
    if top_p < 1.0:
        p, order = torch.softmax(z, -1).sort(-1, descending=True)
        drop_sorted = p.cumsum(-1) - p > top_p  # mass before a token already reaches p
        z = z.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    gumbel = -torch.log(-torch.log(counter_uniform(seeds, step, z.shape[-1])))
    return (z + gumbel).argmax(-1)


__all__ = ["counter_uniform", "sample_next"]
