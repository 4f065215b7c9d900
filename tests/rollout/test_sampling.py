"""Token-by-token sampling (rollout/sampling.py): draws follow softmax(z / T) restricted by top-p, reproducibly, from
(seed, step, vocabulary index) alone."""

import math

import torch

from mgs_megatron.rollout.sampling import counter_uniform, sample_next


def test_frequencies_follow_softmax_over_temperature_and_top_p():
    z = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    n = 40000
    seeds = torch.arange(n, dtype=torch.int64)
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        p = torch.softmax(z.double() / temperature, -1)
        if top_p < 1:
            order = p.argsort(descending=True)
            keep = torch.zeros_like(p, dtype=torch.bool)
            keep[order[(p[order].cumsum(0) - p[order]) <= top_p]] = True
            p = torch.where(keep, p, 0.0)
            p = p / p.sum()
        got = torch.bincount(sample_next(z.expand(n, -1), temperature=temperature, top_p=top_p, seeds=seeds,
                                         step=3), minlength=5).double() / n
        sigma = (p * (1 - p) / n).sqrt()
        assert ((got - p).abs() <= 5 * sigma + 1e-12).all(), (temperature, top_p, got, p)
        assert (got[p == 0] == 0).all()


def test_reproducible_and_independent_of_the_batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16])
    a = sample_next(z, temperature=1.0, top_p=0.9, seeds=seeds, step=7)
    b = torch.cat([sample_next(z[i:i + 1], temperature=1.0, top_p=0.9, seeds=seeds[i:i + 1], step=7)
                   for i in range(6)])
    assert torch.equal(a, b)  # a row's draw does not depend on the other rows
    assert not torch.equal(a, sample_next(z, temperature=1.0, top_p=0.9, seeds=seeds, step=8))
    assert torch.equal(sample_next(z, temperature=0.0, top_p=1.0, seeds=seeds, step=0), z.argmax(-1))


def test_counter_uniform_is_uniform_and_open():
    u = counter_uniform(torch.tensor([5, 6]), 0, 100000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / u.numel())
