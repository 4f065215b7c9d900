"""Gram-form MGS surgery vs the reference per-tensor PCGrad loop vs the memory-traffic floor (CPU or one GPU).

    python benchmarks/bench_surgery.py [--layers 8 --hidden 1024 --ffn 4096 --vocab 16384 --bf16] [--device cuda]

Gram form: gram (one pass over K shards) + pcgrad rule on [M, K, K] + combine (one pass) on a Megatron-style flat
[K, N] stash with fused linear_qkv / linear_fc1 views, parameter granularity (paper's). Reference: per HF tensor a
Python loop, clone each domain grad, per-pair dots with .item(), materialised projections, sum. Floor: (2K+1) x N x
bytes / copy bandwidth (read+write bytes per second of a large torch copy_, measured in the same run).
Extra memory: peak RSS above the pre-run RSS (Linux VmHWM, reset through /proc/self/clear_refs), inputs and the
output buffer preallocated, so it counts only temporaries the method allocates; on a GPU, torch's peak allocated
bytes above the allocation before the call, and every call is timed between two device synchronisations.
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mgs_megatron.surgery import (  # noqa: E402
    ParamLayout,
    build_segments,
    combine,
    fused_gate_up_blocks,
    fused_qkv_blocks,
    get_rule,
    gram,
    pieces_for_shard,
)

K = 3


def llama(layers, hidden, heads, groups, ffn, vocab):
    """(HF layouts in HF order, Megatron fused layouts in buffer order = reverse, as DDP lays them out)."""
    hd, hpg = hidden // heads, heads // groups
    hf = [("model.embed_tokens.weight", (vocab, hidden))]
    mc = [ParamLayout("embedding.word_embeddings.weight", (vocab, hidden), None,
                      ((0, vocab, "model.embed_tokens.weight"),))]
    for i in range(layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (p + f"self_attn.{x}_proj.weight" for x in "qkv")
        g, u = p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"
        hf += [(p + "input_layernorm.weight", (hidden,)), (q, (heads * hd, hidden)), (k, (groups * hd, hidden)),
               (v, (groups * hd, hidden)), (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
               (p + "post_attention_layernorm.weight", (hidden,)), (g, (ffn, hidden)), (u, (ffn, hidden)),
               (p + "mlp.down_proj.weight", (hidden, ffn))]
        mc += [ParamLayout(m + "self_attention.linear_qkv.layer_norm_weight", (hidden,), i,
                           ((0, hidden, p + "input_layernorm.weight"),)),
               ParamLayout(m + "self_attention.linear_qkv.weight", ((heads + 2 * groups) * hd, hidden), i,
                           fused_qkv_blocks(q, k, v, groups, hpg, hd)),
               ParamLayout(m + "self_attention.linear_proj.weight", (hidden, heads * hd), i,
                           ((0, hidden, p + "self_attn.o_proj.weight"),)),
               ParamLayout(m + "mlp.linear_fc1.layer_norm_weight", (hidden,), i,
                           ((0, hidden, p + "post_attention_layernorm.weight"),)),
               ParamLayout(m + "mlp.linear_fc1.weight", (2 * ffn, hidden), i, fused_gate_up_blocks(g, u, ffn)),
               ParamLayout(m + "mlp.linear_fc2.weight", (hidden, ffn), i, ((0, hidden, p + "mlp.down_proj.weight"),))]
    hf += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    mc += [ParamLayout("decoder.final_layernorm.weight", (hidden,), None, ((0, hidden, "model.norm.weight"),)),
           ParamLayout("output_layer.weight", (vocab, hidden), None, ((0, vocab, "lm_head.weight"),))]
    return hf, mc[::-1]


def reference_pcgrad(per_domain, outs, rng, lean=False):
    """The reference implementation's loop (PCGrad, Yu et al.'s form): per tensor, clone each domain grad, per-pair
    dot with .item(), `g_i -= dot * g_j / |g_j|^2` on materialised tensors, sum of the projected grads.
    lean=True: the same loop with the scalar computed first (`g_i.add_(g_j, alpha=-dot / |g_j|^2)`), one pass per
    projection and no full-size temporaries: a generous variant of the reference."""
    for t in range(len(outs)):
        gs = [d[t] for d in per_domain]
        proj = [g.clone() for g in gs]
        for i in range(K):
            order = [j for j in range(K) if j != i]
            rng.shuffle(order)
            for j in order:
                dot = torch.dot(proj[i].flatten(), gs[j].flatten()).item()
                if dot < 0:
                    if lean:
                        proj[i].add_(gs[j], alpha=-dot / torch.dot(gs[j].flatten(), gs[j].flatten()).item())
                    else:
                        proj[i] -= dot * gs[j] / (gs[j].norm() ** 2)
        total = proj[0]
        for p in proj[1:]:
            total += p
        outs[t].copy_(total)


def rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])


def measure(fn, reps, warmup=True, device=torch.device("cpu")):
    """(best seconds over `reps` calls, peak extra memory MiB or None): RSS on the CPU, allocator bytes on a GPU."""
    if warmup:
        fn()
    best, extra = float("inf"), None
    gpu = device.type == "cuda"
    for _ in range(reps):
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 1024
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                base = rss_kb("VmRSS")
            except OSError:
                base = None
        t = time.perf_counter()
        fn()
        if gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        if base is not None:
            peak = torch.cuda.max_memory_allocated() / 1024 if gpu else rss_kb("VmHWM")
            e = (peak - base) / 1024
            extra = e if extra is None else max(extra, e)
    return best, extra


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--bf16", action="store_true", help="also time the Gram form on bf16 gradients")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (Gram form: 3 calls per round)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the floor is then the card's copy bandwidth)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    hf, mc = llama(a.layers, a.hidden, a.heads, a.groups, a.ffn, a.vocab)
    N = sum(lay.numel for lay in mc)
    print(f"# model: {a.layers} Llama layers, hidden {a.hidden}, ffn {a.ffn}, vocab {a.vocab}: {N / 1e6:.1f}M params, "
          f"K={K}, {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}, "
          f"load average before {os.getloadavg()[0]:.2f}")
    seg = build_segments(pieces_for_shard(mc, 0, N), "parameter")
    rule = get_rule("pcgrad", seed=0)
    rows, base = [], {}

    for dtype in [torch.float32] + ([torch.bfloat16] if a.bf16 else []):
        dt = str(dtype).split(".")[-1]
        esz = dtype.itemsize
        src, dst = torch.randn(N, device=dev).to(dtype), torch.empty(N, dtype=dtype, device=dev)
        stash, out = torch.randn(K, N, device=dev).to(dtype), torch.empty(N, dtype=dtype, device=dev)

        def gram_form(kernel="auto", stash=stash, out=out):  # "auto": the compiled one-pass kernels on long runs
            G = gram(seg, stash, kernel=kernel)
            combine(seg, stash, rule.weights(G, seg.module_keys, 0), out, kernel=kernel)

        # (label, fn, calls per round); rounds interleave the methods so that they see the same machine load
        def plain_passes(stash=stash, out=out):  # the Gram form's traffic (read K N twice, write N), torch's own
            stash.sum()
            torch.sum(stash, 0, out=out)

        methods = [("copy", lambda dst=dst, src=src: dst.copy_(src), 2),
                   ("Gram form (gram + pcgrad rule + combine)", gram_form, 3),
                   ("same traffic, plain torch: stash.sum() + sum(stash, 0, out)", plain_passes, 3),
                   ("Gram form, kernel='eager' (batched matmuls, nothing compiled)", lambda: gram_form("eager"), 3)]
        if dtype == torch.float32:
            per_domain = [[torch.randn(s, device=dev) for _, s in hf] for _ in range(K)]  # separate HF tensors
            outs = [torch.empty(s, device=dev) for _, s in hf]
            rng = random.Random(0)
            methods += [(label, lambda lean=lean: reference_pcgrad(per_domain, outs, rng, lean), 1)
                        for lean, label in ((False, "per-tensor loop, reference form"),
                                            (True, "per-tensor loop, lean form"))]
        for _, fn, _ in methods:
            fn()  # warm-up: first-touch page faults of outputs, torch.compile of the Gram form's kernels
        best = {label: (float("inf"), None) for label, _, _ in methods}
        for _ in range(a.rounds):
            for label, fn, calls in methods:
                t, m = measure(fn, calls, warmup=False, device=dev)
                bt, bm = best[label]
                best[label] = (min(bt, t), m if bm is None or (m is not None and m > bm) else bm)
        bw = 2 * N * esz / best["copy"][0]
        rows.append((f"memory-traffic floor (2K+1)N*{esz}B / {bw / 1e9:.1f} GB/s", dt, (2 * K + 1) * N * esz / bw,
                     None))
        rows += [(label, dt) + best[label] for label, _, _ in methods[1:]]
        base[dt] = rows[-len(methods) + 1]  # the Gram form's row
        del src, dst, stash, out, methods
        per_domain = outs = None

    print("| method | dtype | time s | x floor | x Gram-form time | extra MiB | x Gram-form extra |")
    print("|---|---|---|---|---|---|---|")
    floors = {r[1]: r[2] for r in rows if r[3] is None}
    for label, dt, t, m in rows:
        g = base[dt]
        xm = "" if m is None else f"{m / max(g[3], 1.0):.0f}"
        print(f"| {label} | {dt} | {t:.3f} | {t / floors[dt]:.2f} | {t / g[2]:.1f} | "
              f"{'' if m is None else f'{m:.1f}'} | {xm} |")
    print(f"# {seg.num_modules} modules (parameter granularity, fused qkv/fc1 views), {len(seg.runs)} runs; best of "
          f"{a.rounds} interleaved rounds (Gram form {3 * a.rounds} calls, loops {a.rounds}); extra MiB = peak RSS "
          f"above the pre-call RSS (VmHWM reset via /proc/self/clear_refs), ratio with the Gram form's floored at "
          f"1 MiB; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
