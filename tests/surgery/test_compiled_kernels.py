"""The compiled (torch.compile) Gram and combine kernels against independent plain-torch references."""
import pytest
import torch
from surgery_ref import element_modules, llama_layouts, order_for, pcgrad_reference

import mgs_megatron.surgery.compiled as compiled
from mgs_megatron.surgery import (
    SurgeryConfig,
    build_segments,
    combine,
    get_rule,
    gram,
    local_module_names,
    pieces_for_shard,
)

# runs of 8K-64K elements: long enough for the compiled kernels under kernel="compiled", with tails
LAYOUTS = dict(layers=2, hidden=128, heads=4, groups=2, head_dim=32, ffn=200, vocab=301)


def _shards(n):
    return [0, 12345, 40001, n]  # cuts mid-tensor and mid-row


@pytest.mark.parametrize("K", [2, 3])
def test_compiled_pcgrad_matches_per_tensor_reference_fp32(K):
    gen = torch.Generator().manual_seed(K)
    layouts = llama_layouts(**LAYOUTS)
    n = sum(lay.numel for lay in layouts)
    grads = torch.randn(K, n, generator=gen)
    cuts = _shards(n)
    shards = [pieces_for_shard(layouts, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    names = sorted(set().union(*[local_module_names(p, "parameter") for p in shards]))
    segs = [build_segments(p, "parameter", module_names=names) for p in shards]
    G = sum(gram(s, grads[:, a:b], kernel="compiled") for s, a, b in zip(segs, cuts[:-1], cuts[1:]))
    assert "pair_sums" in compiled._compiled
    W = get_rule("pcgrad", seed=2).weights(G, segs[0].module_keys, 5)
    out = torch.empty(n)
    for s, a, b in zip(segs, cuts[:-1], cuts[1:]):
        combine(s, grads[:, a:b], W, out[a:b], kernel="compiled")
    g64 = grads.double()
    for name, idx in element_modules(layouts, "parameter").items():
        x = g64[:, idx]
        torch.testing.assert_close(G[names.index(name)].double(), x @ x.T, rtol=2e-6, atol=2e-6 * idx.numel())
        ref = pcgrad_reference([x[k] for k in range(K)], order_for(name, K, 2, 5))
        torch.testing.assert_close(out[idx].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_compiled_bf16_gram_is_fp32_accurate_and_combine_rounds_once():
    gen = torch.Generator().manual_seed(9)
    layouts = llama_layouts(**LAYOUTS)
    n = sum(lay.numel for lay in layouts)
    g16 = torch.randn(3, n, generator=gen).bfloat16()
    seg = build_segments(pieces_for_shard(layouts, 0, n), "parameter")
    G = gram(seg, g16, kernel="compiled")
    g64 = g16.double()  # exact: bf16 products are exact in fp32, only the fp32 accumulation may round
    for name, idx in element_modules(layouts, "parameter").items():
        x = g64[:, idx]
        torch.testing.assert_close(G[seg.module_names.index(name)].double(), x @ x.T, rtol=2e-6,
                                   atol=2e-6 * idx.numel())
    W = get_rule("pcgrad").weights(G, seg.module_keys, 1)
    out = combine(seg, g16, W, torch.empty(n, dtype=torch.bfloat16), kernel="compiled")
    expect, scale = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for name, idx in element_modules(layouts, "parameter").items():
        w = W[seg.module_names.index(name)].double()
        expect[idx], scale[idx] = w @ g64[:, idx], w.abs() @ g64[:, idx].abs()
    # fp32 accumulation, then one rounding to bf16: within half a bf16 ulp (2^-8 relative) of the exact sum
    err = (out.double() - expect).abs()
    assert (err <= expect.abs() * 2.0 ** -8 + 1e-6 * scale).all(), (err - expect.abs() * 2.0 ** -8).max()


def test_auto_uses_compiled_only_for_long_runs_and_falls_back_on_failure(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(compiled, "_unavailable", {})
    assert not compiled.use_compiled("auto", compiled.AUTO_MIN_ELEMENTS - 1, cpu)
    assert compiled.use_compiled("auto", compiled.AUTO_MIN_ELEMENTS, cpu)
    assert not compiled.use_compiled("eager", 1 << 30, cpu)
    assert compiled.use_compiled("compiled", 2 * compiled.BLOCK, cpu)
    assert not compiled.use_compiled("compiled", 100, cpu)

    def broken(name):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiled, "_get", broken)
    monkeypatch.setattr(compiled, "AUTO_MIN_ELEMENTS", 2 * compiled.BLOCK)
    layouts = llama_layouts(**LAYOUTS)
    n = sum(lay.numel for lay in layouts)
    grads = torch.randn(3, n, dtype=torch.float64)
    seg = build_segments(pieces_for_shard(layouts, 0, n), "layer")
    with pytest.warns(RuntimeWarning, match="torch.compile of pair_sums failed on cpu"):
        G = gram(seg, grads, dtype=torch.float64, kernel="auto")
    assert "cpu" in compiled._unavailable and not compiled.use_compiled("auto", 1 << 30, cpu)
    for name, idx in element_modules(layouts, "layer").items():
        x = grads[:, idx]
        torch.testing.assert_close(G[seg.module_names.index(name)], x @ x.T)
    with pytest.raises(RuntimeError, match="kernel='compiled': torch.compile of pair_sums failed"):
        gram(seg, grads, dtype=torch.float64, kernel="compiled")


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="unknown surgery kernel 'triton'"):
        SurgeryConfig(kernel="triton")
