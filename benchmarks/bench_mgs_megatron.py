"""Cost of an MGS step vs an ordinary Megatron step on the same model and batch (CPU, gloo).

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_mgs_megatron.py [--tp 1]
    .venv/bin/python -m torch.distributed.run --nproc-per-node 4 benchmarks/bench_mgs_megatron.py --pp 2   # or 4

Ordinary step: one schedule call over all micro-batches + optimizer.step(). MGS step: one schedule call per domain
(K = 3) + surgery + optimizer.step(). MGS one-schedule step (with --pp > 1): all domains in one schedule call,
the gradients separated on every stage (mgs.one_schedule). All use the distributed optimizer. Prints ratios
measured in one run (medians over interleaved repeats), the pipeline bubble share of each (the 1F1B model: p - 1
idle micro-batch slots per schedule call and stage, out of m + p - 1), the surgery's extra memory (the K x N / DP
stash) and the bytes of its one all-reduce.

`--device-ms T`: every micro-batch also holds its stage for T ms in the forward and 2T ms in the backward
(time.sleep): a stand-in for a device of its own per rank. On this CPU several ranks share a core, so a stage
waiting in the pipeline bubble hands its core to another rank and the bubble costs little; with a device per rank
(and a small model, so the sleep dominates) idle stage time is lost time, as on GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.distributed as dist

DOMAINS = ("math", "chat", "if")


class _DeviceTime(torch.autograd.Function):
    """Holds the stage for t seconds in the forward and 2t in the backward (see --device-ms)."""

    @staticmethod
    def forward(ctx, x, t):
        ctx.t = t
        time.sleep(t)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.t)
        return grad, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rows-per-domain", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device-ms", type=float, default=0.0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from mgs_megatron import MGSConfig, ModularGradientSurgery
    from mgs_megatron.megatron import parallel
    from mgs_megatron.megatron.domain_step import domain_step
    from mgs_megatron.megatron.model import ModelConfig, ParallelConfig, PrecisionConfig, build_gpt_model
    from mgs_megatron.megatron.optim import build_optimizer, wrap_ddp, zero_grads
    from mgs_megatron.megatron.schedule import configure_grad_sync, forward_backward
    from mgs_megatron.testing.tiny import dp_slice, lm_micro_batches, token_batches

    cfg = ModelConfig("qwen2", vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                      head_dim=64, qkv_bias=True, max_position_embeddings=args.seq)
    layout = ParallelConfig(args.tp, args.pp)
    parallel.initialize(layout, device="cpu")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def build():
        torch.manual_seed(0)
        model = build_gpt_model(cfg, layout, PrecisionConfig(calculate_per_token_loss=True))
        chunks = wrap_ddp([model], DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                 use_distributed_optimizer=True))
        opt = build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-5, use_distributed_optimizer=True))
        if args.device_ms:
            model.register_forward_hook(lambda m, i, out: _DeviceTime.apply(out, args.device_ms / 1e3))
        return chunks, opt

    batches = {d: lm_micro_batches(dp_slice(token_batches(args.rows_per_domain * dp, args.seq, cfg.vocab_size,
                                                          seed=i), dp_rank, dp), 1)
               for i, d in enumerate(DOMAINS)}

    def run(fn, n):
        times = []
        for _ in range(n):
            dist.barrier()
            t = time.perf_counter()
            fn()
            dist.barrier()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:]) if n > 1 else times[0]

    chunks, opt = build()
    configure_grad_sync(chunks)

    def ordinary():
        zero_grads(chunks, opt)
        allb = [b for bs in batches.values() for b in bs]
        forward_backward(chunks, allb, num_microbatches=len(allb), seq_length=args.seq, micro_batch_size=1)
        opt.step()

    chunks2, opt2 = build()
    mgs = ModularGradientSurgery(chunks2, opt2, MGSConfig(rule="pcgrad"), DOMAINS)
    all_stats = []

    def fb(bs):
        return forward_backward(chunks2, bs, num_microbatches=len(bs), seq_length=args.seq, micro_batch_size=1)

    def mgs_step():
        all_stats.append(domain_step(chunks2, opt2, batches, fb, mgs=mgs).surgery_stats)

    def mgs_one_schedule():
        domain_step(chunks2, opt2, batches, fb, mgs=mgs, one_schedule=True)

    # interleave the variants so machine noise hits all alike
    variants = {"ordinary": ordinary, "mgs": mgs_step}
    if args.pp > 1:
        variants["one"] = mgs_one_schedule
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            times[k].append(run(fn, 1))
    stats = all_stats[-1]
    surgery_time = [st["surgery/seconds"] for st in all_stats[1:]]
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    param_bytes = n_params * 4
    m_dom = len(batches[DOMAINS[0]])  # micro-batches per domain and rank
    p, K = args.pp, len(DOMAINS)

    def bubble(calls: int) -> float:  # 1F1B: p - 1 idle slots per call and stage, out of (M + calls (p - 1))
        return calls * (p - 1) / (K * m_dom + calls * (p - 1))

    if dist.get_rank() == 0:
        o, m, s = (statistics.median(times["ordinary"]), statistics.median(times["mgs"]),
                   statistics.median(surgery_time))
        print(f"model: {n_params / 1e6:.1f}M params/rank, world {dist.get_world_size()} (tp {args.tp}, pp {p}, "
              f"dp {dp}), K = {K}, {args.rows_per_domain * dp} x {args.seq} tokens per domain, {m_dom} "
              f"micro-batches per domain and rank" + (f", device time {args.device_ms:g} ms forward + "
                                                        f"{2 * args.device_ms:g} ms backward per micro-batch and "
                                                        f"stage" if args.device_ms else ""))
        print("| quantity | value | ratio | pipeline bubble share (1F1B model) |")
        print("|---|---|---|---|")
        print(f"| ordinary step (s) | {o:.3f} | 1.00 | {bubble(1):.3f} |")
        print(f"| MGS step, K schedule calls (s) | {m:.3f} | {m / o:.3f} | {bubble(K):.3f} |")
        if "one" in times:
            one = statistics.median(times["one"])
            print(f"| MGS step, one schedule call (s) | {one:.3f} | {one / o:.3f} | {bubble(1):.3f} |")
        print(f"| of which surgery: Gram + all-reduce + rule + combine (s) | {s:.4f} | {s / o:.4f} | |")
        print(f"| extra memory: K x N / DP stash (MiB) | {stats['surgery/stash_bytes'] / 2**20:.1f} | "
              f"{stats['surgery/stash_bytes'] / param_bytes:.2f} x fp32 params/rank | |")
        if "one" in times:
            print(f"| one schedule call, extra: K x N unreduced copies during the step (MiB) | "
                  f"{K * param_bytes / 2**20:.1f} | {K:.2f} x fp32 params/rank | |")
        print(f"| surgery all-reduce (bytes) | {stats['surgery/allreduce_bytes']:.0f} | "
              f"{stats['surgery/allreduce_bytes'] / param_bytes:.2e} x fp32 params/rank | |")
    parallel.destroy()


if __name__ == "__main__":
    main()
