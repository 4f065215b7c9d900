import pytest
import torch
from surgery_ref import element_modules, llama_layouts, order_for, pcgrad_reference

from mgs_megatron.surgery import (
    GRANULARITIES,
    build_segments,
    combine,
    get_rule,
    gram,
    local_module_names,
    pieces_for_shard,
)


def _cuts(n, parts, gen):
    """Arbitrary shard boundaries (not aligned to rows or parameters)."""
    c = sorted(torch.randint(1, n, (parts - 1,), generator=gen).tolist())
    return [0] + c + [n]


def _surgery_sharded(layouts, grads, granularity, rule, step, cuts, dtype=torch.float64, domains=None):
    """What the distributed glue does: segments per shard against the global module list, partial Grams summed
    (the all-reduce), one W for everyone, combine per shard."""
    shards = [pieces_for_shard(layouts, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    names = sorted(set().union(*[local_module_names(p, granularity) for p in shards]))
    segs = [build_segments(p, granularity, module_names=names) for p in shards]
    G = sum(gram(s, grads[:, a:b], dtype=dtype) for s, a, b in zip(segs, cuts[:-1], cuts[1:]))
    W = rule.weights(G, segs[0].module_keys, step, domains)
    out = torch.empty(grads.shape[1], dtype=grads.dtype)
    for s, a, b in zip(segs, cuts[:-1], cuts[1:]):
        combine(s, [g[a:b] for g in grads], W, out[a:b])  # list input: exercises the scratch path
    return out, G, W, names


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_pcgrad_matches_per_tensor_reference(K, granularity):
    gen = torch.Generator().manual_seed(K * 7 + len(granularity))
    layouts = llama_layouts(bias=True)
    n = sum(lay.numel for lay in layouts)
    grads = torch.randn(K, n, generator=gen, dtype=torch.float64)
    seed, step = 3, 11
    out, _, _, names = _surgery_sharded(layouts, grads, granularity, get_rule("pcgrad", seed=seed), step,
                                        _cuts(n, 5, gen))
    mods = element_modules(layouts, granularity)
    assert sorted(mods) == names
    for name, idx in mods.items():
        ref = pcgrad_reference([grads[k][idx] for k in range(K)], order_for(name, K, seed, step))
        torch.testing.assert_close(out[idx], ref, rtol=1e-6, atol=1e-9 * ref.abs().max().item())


def test_stacked_fast_path_equals_list_path_fp32():
    gen = torch.Generator().manual_seed(0)
    layouts = llama_layouts(layers=3, hidden=16, ffn=40, vocab=50)
    n = sum(lay.numel for lay in layouts)
    grads = torch.randn(3, n, generator=gen)
    seg = build_segments(pieces_for_shard(layouts, 0, n), "parameter")
    G1, G2 = gram(seg, grads), gram(seg, list(grads))
    torch.testing.assert_close(G1, G2, rtol=1e-5, atol=1e-4)
    W = get_rule("pcgrad").weights(G1, seg.module_keys, 0)
    o1, o2 = combine(seg, grads, W, torch.empty(n)), combine(seg, list(grads), W, torch.empty(n))
    torch.testing.assert_close(o1, o2)


def test_long_runs_use_chunked_bmm_and_stay_exact():
    gen = torch.Generator().manual_seed(1)
    from mgs_megatron.surgery import ParamLayout
    lay = ParamLayout("big.weight", (3 * 40000 + 17,))
    grads = torch.randn(3, lay.numel, generator=gen, dtype=torch.float64)
    seg = build_segments([(lay, 5, lay.numel - 3, 0)], "parameter")
    G = gram(seg, grads[:, : lay.numel - 8], dtype=torch.float64)
    x = grads[:, : lay.numel - 8]
    torch.testing.assert_close(G[0], x @ x.T, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sum_rule_is_plain_sum(granularity):
    gen = torch.Generator().manual_seed(2)
    layouts = llama_layouts()
    n = sum(lay.numel for lay in layouts)
    grads = torch.randn(3, n, generator=gen, dtype=torch.float64)
    out, *_ = _surgery_sharded(layouts, grads, granularity, get_rule("sum"), 0, _cuts(n, 3, gen))
    torch.testing.assert_close(out, grads.sum(0))


def test_no_conflict_pcgrad_equals_sum():
    gen = torch.Generator().manual_seed(3)
    layouts = llama_layouts()
    n = sum(lay.numel for lay in layouts)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    grads = base + 0.1 * torch.randn(4, n, generator=gen, dtype=torch.float64)
    out, G, _, _ = _surgery_sharded(layouts, grads, "parameter", get_rule("pcgrad"), 5, _cuts(n, 4, gen))
    assert (G >= 0).all()
    torch.testing.assert_close(out, grads.sum(0))


def test_k2_projected_gradients_no_longer_conflict():
    gen = torch.Generator().manual_seed(4)
    M = 200
    X = torch.randn(M, 2, 50, generator=gen, dtype=torch.float64)
    G = X @ X.transpose(1, 2)
    rule = get_rule("pcgrad")
    keys = torch.arange(M)
    A = rule.projections(G, keys, 0)
    P = A @ X  # projected gradients per module
    dots = (P[:, 0] * X[:, 1]).sum(-1), (P[:, 1] * X[:, 0]).sum(-1)
    assert (G[:, 0, 1] < 0).sum() > 50
    for d in dots:
        assert (d > -1e-9 * G.diagonal(dim1=1, dim2=2).sum(-1)).all()
    conflict = G[:, 0, 1] < 0
    assert ((P[conflict, 0] * P[conflict, 1]).sum(-1) >= -1e-9).all()  # and not with each other
    torch.testing.assert_close(A.sum(1), rule.weights(G, keys, 0))


def test_same_seed_step_module_same_result_and_layout_independent():
    gen = torch.Generator().manual_seed(5)
    M, K = 64, 4
    X = torch.randn(M, K, 30, generator=gen, dtype=torch.float64)
    G = X @ X.transpose(1, 2)
    keys = torch.randint(0, 2**62, (M,), generator=gen)
    r = get_rule("pcgrad", seed=9)
    W1, W2 = r.weights(G, keys, 7), get_rule("pcgrad", seed=9).weights(G, keys, 7)
    assert torch.equal(W1, W2)
    perm = torch.randperm(M, generator=gen)  # another layout listing modules differently
    assert torch.equal(r.weights(G[perm], keys[perm], 7), W1[perm])
    assert not torch.equal(r.weights(G, keys, 8), W1)  # the order changes with the step
    assert not torch.equal(get_rule("pcgrad", seed=10).weights(G, keys, 7), W1)


def test_orders_are_permutations_of_other_domains():
    from mgs_megatron.surgery import domain_orders
    o = domain_orders(1, 2, torch.arange(100), 5)
    for i in range(5):
        s = o[:, i].sort(-1).values
        assert torch.equal(s, torch.tensor([j for j in range(5) if j != i]).expand(100, 4))
    firsts = o[:, 0, 0].bincount(minlength=5)  # roughly uniform first pick
    assert firsts[0] == 0 and (firsts[1:] > 10).all()


def test_bf16_within_bf16_tolerance_of_fp64_reference():
    gen = torch.Generator().manual_seed(6)
    layouts = llama_layouts(layers=2, hidden=32, ffn=64, vocab=40)
    n = sum(lay.numel for lay in layouts)
    g16 = torch.randn(3, n, generator=gen).bfloat16()
    seg = build_segments(pieces_for_shard(layouts, 0, n), "parameter")
    G = gram(seg, g16)
    assert G.dtype == torch.float32
    W = get_rule("pcgrad").weights(G, seg.module_keys, 1)
    out = combine(seg, g16, W, torch.empty(n, dtype=torch.bfloat16))
    g64 = g16.double()
    for name, idx in element_modules(layouts, "parameter").items():
        ref = pcgrad_reference([g64[k][idx] for k in range(3)], order_for(name, 3, 0, 1))
        err = (out[idx].double() - ref).norm() / ref.norm()
        assert err < 1e-2, name


def test_zero_domain_gradient_no_nan():
    gen = torch.Generator().manual_seed(7)
    layouts = llama_layouts()
    n = sum(lay.numel for lay in layouts)
    grads = torch.randn(3, n, generator=gen, dtype=torch.float64)
    grads[1] = 0
    grads[2, :50] = 0  # zero on some modules only
    for rule in ("pcgrad", "gradvac", "sum"):
        out, G, W, _ = _surgery_sharded(layouts, grads, "parameter", get_rule(rule), 0, _cuts(n, 3, gen),
                                        domains=["a", "b", "c"])
        assert torch.isfinite(W).all() and torch.isfinite(out).all()
    out, *_ = _surgery_sharded(layouts, grads, "parameter", get_rule("pcgrad"), 0, [0, n])
    for name, idx in element_modules(layouts, "parameter").items():
        ref = pcgrad_reference([grads[k][idx] for k in range(3)], order_for(name, 3, 0, 0))
        torch.testing.assert_close(out[idx], ref, rtol=1e-6, atol=1e-12)


def test_uncovered_elements_get_plain_sum_and_out_may_alias_a_grad():
    from mgs_megatron.surgery import ParamLayout
    lay = ParamLayout("w", (4, 3))
    grads = torch.randn(2, 20, dtype=torch.float64)
    seg = build_segments([(lay, 0, 12, 4)], "parameter")  # padding at [0, 4) and [16, 20)
    W = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    expect = grads.sum(0)
    expect[4:16] = 2 * grads[0, 4:16] - grads[1, 4:16]
    torch.testing.assert_close(combine(seg, grads, W, torch.empty(20, dtype=torch.float64)), expect)
    g = grads.clone()
    torch.testing.assert_close(combine(seg, g, W, g[0]), expect)  # in place into domain 0's shard


def test_chunk_boundaries_small_scratch(monkeypatch):
    import mgs_megatron.surgery.passes as kern
    monkeypatch.setattr(kern, "_SCRATCH", 997)  # odd sizes: chunks end mid-row and mid-bmm-block
    monkeypatch.setattr(kern, "_BMM_CHUNK", 64)
    monkeypatch.setattr(kern, "_COMBINE_CHUNK", 100)
    gen = torch.Generator().manual_seed(8)
    layouts = llama_layouts(layers=2, hidden=32, ffn=64, vocab=40)
    n = sum(lay.numel for lay in layouts)
    grads = torch.randn(3, n, generator=gen, dtype=torch.float64)
    seg = build_segments(pieces_for_shard(layouts, 0, n), "layer")
    G64 = gram(seg, grads, dtype=torch.float64)
    for name, idx in element_modules(layouts, "layer").items():
        x = grads[:, idx]
        torch.testing.assert_close(G64[seg.module_names.index(name)], x @ x.T)
    torch.testing.assert_close(gram(seg, list(grads.float())), G64.float(), rtol=1e-5, atol=1e-3)
    W = get_rule("pcgrad").weights(G64, seg.module_keys, 0)
    expect = combine(seg, grads, W, torch.empty(n, dtype=torch.float64))
    g = grads.clone()
    torch.testing.assert_close(combine(seg, list(g), W, g[2]), expect)  # list path, out aliases a shard
    o16 = combine(seg, grads.bfloat16(), W, torch.empty(n, dtype=torch.bfloat16))
    assert ((o16.double() - expect).norm() / expect.norm()) < 1e-2
