"""Save and load time of a live model's weights: Megatron-LM's torch_dist format vs our canonical format (CPU, gloo).

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_checkpoint.py [--tp 2] [--dir D]

~570 MB of fp32 weights (Llama-shaped: hidden 1024, 6 layers, vocab 32000). torch_dist: every rank writes and
reads only its own shards (Megatron's dist_checkpointing, weights/torch_dist.py). Canonical: full tensors
gathered to rank 0, which writes safetensors shards; on load every rank reads (mmap) the tensors of its stage and
slices its TP shard (weights/live.py). Both write into a temp directory renamed at the end. Medians of interleaved
repeats; loads read files the page cache still holds (the same for both).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    from mgs_megatron.megatron import parallel
    from mgs_megatron.megatron.model import ModelConfig, ParallelConfig, build_gpt_model
    from mgs_megatron.weights import load_weights, save_weights
    from mgs_megatron.weights.torch_dist import load_torch_dist, save_torch_dist

    cfg = ModelConfig("llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=6,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)
    layout = ParallelConfig(args.tp)
    parallel.initialize(layout, device="cpu")
    rank = dist.get_rank()
    torch.manual_seed(0)
    chunks = [build_gpt_model(cfg, layout)]
    n_local = sum(p.numel() for p in chunks[0].parameters())
    root = Path(args.dir or tempfile.gettempdir()) / "mgs_bench_checkpoint"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()

    def timed(fn) -> float:
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t

    fmt = {"torch_dist": (lambda: save_torch_dist(chunks, cfg, root / "td", 1),
                          lambda: load_torch_dist(chunks, root / "td")),
           "canonical (mgs)": (lambda: save_weights(chunks, cfg, root / "mgs", overwrite=True),
                               lambda: load_weights(chunks, root / "mgs"))}
    times = {(f, op): [] for f in fmt for op in ("save", "load")}
    for _ in range(args.repeats):
        for f, (save, load) in fmt.items():
            times[f, "save"].append(timed(save))
            times[f, "load"].append(timed(load))
    sizes = {f: _size(root / d) for f, d in (("torch_dist", "td"), ("canonical (mgs)", "mgs"))}
    totals = torch.tensor([float(n_local)])
    dist.all_reduce(totals)
    if rank == 0:
        ref = {op: statistics.median(times["canonical (mgs)", op]) for op in ("save", "load")}
        print(f"model: {cfg.architecture}, {n_local / 1e6:.1f}M parameters per rank, world {dist.get_world_size()} "
              f"(tp {args.tp}), fp32; {args.repeats} interleaved repeats, medians")
        print("| format | save (s) | save ratio | load (s) | load ratio | on disk (MB) |")
        print("|---|---|---|---|---|---|")
        for f in fmt:
            s, lo = statistics.median(times[f, "save"]), statistics.median(times[f, "load"])
            print(f"| {f} | {s:.2f} | {s / ref['save']:.2f} | {lo:.2f} | {lo / ref['load']:.2f} | "
                  f"{sizes[f] / 1e6:.0f} |")
        shutil.rmtree(root, ignore_errors=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
