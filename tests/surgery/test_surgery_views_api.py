import math

import pytest
import torch
from surgery_ref import order_for, pcgrad_reference

from mgs_megatron.surgery import (
    MGS,
    ParamLayout,
    SurgeryConfig,
    apply_mgs,
    build_segments,
    combine,
    fused_gate_up_blocks,
    fused_qkv_blocks,
    get_rule,
    gram,
    module_key,
    pieces_for_shard,
    surgery_stats,
    surgery_tensors,
    weights_from_gram,
)

H, NH, NG, HD, F, K = 8, 8, 4, 2, 12, 3
HPG = NH // NG
P = "model.layers.0."
QKV = [P + f"self_attn.{x}_proj.{{}}" for x in "qkv"]
GU = [P + "mlp.gate_proj.weight", P + "mlp.up_proj.weight"]


def _hf(gen):
    shapes = {QKV[0].format("weight"): (NH * HD, H), QKV[1].format("weight"): (NG * HD, H),
              QKV[2].format("weight"): (NG * HD, H), QKV[0].format("bias"): (NH * HD,),
              QKV[1].format("bias"): (NG * HD,), QKV[2].format("bias"): (NG * HD,), GU[0]: (F, H), GU[1]: (F, H)}
    return {n: torch.randn(K, *s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}


def _fuse(hf, tp, r, kind):
    """Megatron fusion on TP rank r: per local query group [q heads of the group, k, v]; fc1 = [gate; up]."""
    q, k, v = (hf[n.format(kind)] for n in QKV)
    g0, g1 = r * NG // tp, (r + 1) * NG // tp
    parts = []
    for g in range(g0, g1):
        parts += [q[:, g * HPG * HD:(g + 1) * HPG * HD], k[:, g * HD:(g + 1) * HD], v[:, g * HD:(g + 1) * HD]]
    return torch.cat(parts, 1)


def _rank_buffer(hf, tp, r):
    """Flat [K, N] buffer of TP rank r, parameters in reverse order as Megatron's DDP buffers lay them out."""
    f = F // tp
    fc1 = torch.cat([hf[GU[0]][:, r * f:(r + 1) * f], hf[GU[1]][:, r * f:(r + 1) * f]], 1)
    qkv_w, qkv_b = _fuse(hf, tp, r, "weight"), _fuse(hf, tp, r, "bias")
    lays = [ParamLayout("decoder.layers.0.mlp.linear_fc1.weight", fc1.shape[1:], 0, fused_gate_up_blocks(*GU, f)),
            ParamLayout("decoder.layers.0.self_attention.linear_qkv.bias", qkv_b.shape[1:], 0,
                        fused_qkv_blocks(*(n.format("bias") for n in QKV), NG // tp, HPG, HD)),
            ParamLayout("decoder.layers.0.self_attention.linear_qkv.weight", qkv_w.shape[1:], 0,
                        fused_qkv_blocks(*(n.format("weight") for n in QKV), NG // tp, HPG, HD))]
    buf = torch.cat([fc1.flatten(1), qkv_b.flatten(1), qkv_w.flatten(1)], 1)
    return lays, buf


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dp", [1, 3])
def test_fused_views_gram_equals_hf_tensors_gram(tp, dp):
    gen = torch.Generator().manual_seed(tp * 10 + dp)
    hf = _hf(gen)
    names = sorted(hf)
    G = torch.zeros(len(names), K, K, dtype=torch.float64)
    for r in range(tp):
        lays, buf = _rank_buffer(hf, tp, r)
        n = buf.shape[1]
        cuts = [0] + sorted(torch.randint(1, n, (dp - 1,), generator=gen).tolist()) + [n]  # mid-row DP shards
        for a, b in zip(cuts[:-1], cuts[1:]):
            seg = build_segments(pieces_for_shard(lays, a, b), "parameter", module_names=names)
            G += gram(seg, buf[:, a:b], dtype=torch.float64)
    for m, name in enumerate(names):
        x = hf[name].flatten(1)
        torch.testing.assert_close(G[m], x @ x.T, rtol=1e-12, atol=1e-10, msg=name)


def test_gradvac_matches_materialised_reference_over_steps_and_state_roundtrip():
    gen = torch.Generator().manual_seed(11)
    M, L, beta = 20, 40, 0.3
    names = [f"m{i}.weight" for i in range(M)]
    keys = torch.tensor([module_key(n) for n in names])
    rule = get_rule("gradvac", beta=beta, seed=2)
    rho_t = torch.zeros(M, K, K, dtype=torch.float64)
    for step in range(3):
        X = torch.randn(M, K, L, generator=gen, dtype=torch.float64)
        W = rule.weights(X @ X.transpose(1, 2), keys, step, ["a", "b", "c"])
        for m in range(M):  # LibMTL-style loop on materialised gradients
            g = X[m]
            out = torch.zeros(L, dtype=torch.float64)
            for i, order in enumerate(order_for(names[m], K, 2, step).tolist()):
                pc = g[i].clone()
                for j in order:
                    rho = (pc @ g[j] / (pc.norm() * g[j].norm())).item()
                    t = rho_t[m, i, j].item()
                    if rho < t:
                        pc += g[j] * pc.norm() * (t * math.sqrt(1 - rho**2) - rho * math.sqrt(1 - t**2)) / (
                            g[j].norm() * math.sqrt(1 - t**2))
                    rho_t[m, i, j] = (1 - beta) * t + beta * rho
                out += pc
            torch.testing.assert_close(W[m] @ g, out, rtol=1e-6, atol=1e-9)
    sd = rule.state_dict()
    fresh = get_rule("gradvac", beta=beta, seed=2)
    fresh.load_state_dict(sd)
    X = torch.randn(M, K, L, generator=gen, dtype=torch.float64)
    G = X @ X.transpose(1, 2)
    torch.testing.assert_close(fresh.weights(G, keys, 3, ["a", "b", "c"]), rule.weights(G, keys, 3, ["a", "b", "c"]))
    # a missing domain keeps the state of the others (keyed by domain name, not position)
    w2 = rule.weights(G[:, [0, 2]][:, :, [0, 2]], keys, 4, ["a", "c"])
    assert torch.isfinite(w2).all() and w2.shape == (M, 2)


def test_stats_values():
    gen = torch.Generator().manual_seed(12)
    names = [P + "self_attn.q_proj.weight", P + "self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight",
             "model.embed_tokens.weight"]
    X = torch.randn(4, K, 30, generator=gen, dtype=torch.float64)
    G = X @ X.transpose(1, 2)
    W = get_rule("pcgrad").weights(G, torch.tensor([module_key(n) for n in names]), 0)
    s = surgery_stats(G, W, names, ["math", "chat", "if"])
    assert all(isinstance(v, float) for v in s.values())
    q = X[[0, 2]].transpose(0, 1).flatten(1)  # the q_proj group's concatenated gradient
    assert s["surgery/cos/math-chat/q_proj"] == pytest.approx(torch.cosine_similarity(q[0], q[1], 0).item())
    assert s["surgery/norm/if/layer.1"] == pytest.approx(X[2, 2].norm().item())
    after = torch.cat([W[m] @ X[m] for m in range(4)])
    assert s["surgery/norm_after/all"] == pytest.approx(after.norm().item())
    assert s["surgery/norm_sum/embed_tokens"] == pytest.approx(X[3].sum(0).norm().item())
    assert s["surgery/conflicts/math-chat"] == float((G[:, 0, 1] < 0).sum())
    t = surgery_tensors(G, W)
    assert t["cos"].shape == (4, K, K) and t["norm_after"].shape == (4,)


def test_apply_mgs_on_module_writes_grads_and_handles_missing():
    torch.manual_seed(13)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    names = [n for n, _ in model.named_parameters()]
    grads = {d: {n: torch.randn_like(p, dtype=torch.float64).float() for n, p in model.named_parameters()}
             for d in ["math", "chat", "if"]}
    grads["chat"].pop("1.bias")  # a parameter missing in one domain = zero there
    grads["empty"] = {}  # a domain with no gradient this step is absent
    stats = apply_mgs(model, grads, SurgeryConfig(rule="pcgrad", seed=4), step=2, return_tensors=True)
    assert stats["surgery/num_domains"] == 3.0 and stats["tensors"]["domains"] == ["chat", "if", "math"]
    for n, p in model.named_parameters():
        gs = [grads[d].get(n, torch.zeros_like(p)).flatten().double() for d in ["chat", "if", "math"]]
        ref = pcgrad_reference(gs, order_for(n, 3, 4, 2))
        torch.testing.assert_close(p.grad.flatten().double(), ref, rtol=1e-5, atol=1e-6)
    assert len(names) == 4
    mgs = MGS(SurgeryConfig(rule="gradvac"))
    mgs.apply(model, grads, 0)
    assert mgs.state_dict()["rule"]["rho"].shape == (4, 3, 3)


def test_bad_inputs_name_the_culprit():
    with pytest.raises(ValueError, match="bogus"):
        get_rule("bogus")
    with pytest.raises(ValueError, match="betta"):
        get_rule("gradvac", betta=0.1)
    with pytest.raises(ValueError, match="per-block"):
        SurgeryConfig(granularity="per-block")
    with pytest.raises(ValueError, match="nonsense"):
        SurgeryConfig(rule="nonsense")
    lay = ParamLayout("x.weight", (4, 3))
    with pytest.raises(ValueError, match="granularity 'row'"):
        build_segments([(lay, 0, 12, 0)], "row")
    with pytest.raises(ValueError, match="x.weight"):
        build_segments([(lay, 0, 13, 0)], "parameter")
    with pytest.raises(ValueError, match="x.weight"):
        ParamLayout("x.weight", (4, 3), blocks=((0, 2, "a"), (3, 4, "b")))
    seg = build_segments([(lay, 0, 12, 0)], "parameter")
    with pytest.raises(ValueError, match="domain 1"):
        gram(seg, [torch.zeros(12), torch.zeros(11)])
    with pytest.raises(ValueError, match="x.weight"):
        gram(seg, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="W must be"):
        combine(seg, torch.zeros(2, 12), torch.ones(1, 3), torch.empty(12))
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="'weight'"):
        apply_mgs(model, {"a": {"weight": torch.zeros(3, 2)}})
    with pytest.raises(ValueError, match="nope"):
        apply_mgs(model, {"a": {"nope": torch.zeros(3, 2)}})
    with pytest.raises(ValueError, match="overlap"):
        build_segments([(lay, 0, 12, 0), (ParamLayout("y", (5,)), 0, 5, 10)], "parameter")


def test_nonfinite_error_or_counted_fallback():
    lays = [ParamLayout("a.weight", (4,)), ParamLayout("b.weight", (4,))]
    seg = build_segments(pieces_for_shard(lays, 0, 8), "parameter")
    g = torch.randn(2, 8)
    g[1, 5] = float("nan")
    G = gram(seg, g)
    with pytest.raises(ValueError, match=r"'b.weight' \(domains \['chat'\]\)"):
        weights_from_gram(get_rule("pcgrad"), G, seg, 0, ["math", "chat"])
    W, nbad = weights_from_gram(get_rule("pcgrad"), G, seg, 0, ["math", "chat"], on_nonfinite="sum")
    assert nbad == 1 and torch.equal(W[1], torch.ones(2)) and torch.isfinite(W).all()
    model = torch.nn.Linear(2, 1, bias=False)
    bad = {"a": {"weight": torch.tensor([[float("inf"), 0.0]])}, "b": {"weight": torch.ones(1, 2)}}
    s = apply_mgs(model, bad, SurgeryConfig(on_nonfinite="sum"))
    assert s["surgery/nonfinite_modules"] == 1.0
