#!/usr/bin/env python
"""Conversion throughput (GB/s) vs a plain safetensors load + save of the same bytes (one run each).

  .venv/bin/python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--layers 12] [--hidden 768]

Builds a random Llama-shaped HF checkpoint (fp32, ~500 MB by default), then times:
  baseline     read every tensor of the HF dir and write it back as sharded safetensors (no conversion)
  hf-to-mcore  mgs_megatron.convert.hf_to_mcore_checkpoint (qkv / gate-up fusing)
  mcore-to-hf  mgs_megatron.convert.mcore_to_hf_checkpoint (splitting)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from mgs_megatron.convert import hf_to_mcore_checkpoint, mcore_to_hf_checkpoint  # noqa: E402
from mgs_megatron.convert.io import SafetensorsDir, atomic_dir, write_sharded  # noqa: E402
from mgs_megatron.models import hf_shapes, model_config_from_hf  # noqa: E402


def make_hf(dst: Path, layers: int, hidden: int) -> int:
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": hidden,
          "intermediate_size": hidden * 8 // 3 // 64 * 64, "num_hidden_layers": layers, "num_attention_heads": 12,
          "num_key_value_heads": 4, "head_dim": hidden // 12, "rms_norm_eps": 1e-5, "hidden_act": "silu",
          "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "tie_word_embeddings": False,
          "max_position_embeddings": 4096}
    cfg = model_config_from_hf(hf)
    g = torch.Generator().manual_seed(0)
    tensors = ((n, torch.randn(s, generator=g)) for n, s in hf_shapes(cfg).items())
    with atomic_dir(dst, overwrite=True) as tmp:
        write_sharded(tmp, tensors, 1 << 30)
        (tmp / "config.json").write_text(json.dumps(hf))
    return SafetensorsDir(dst).nbytes()


def baseline(src: Path, dst: Path) -> None:
    s = SafetensorsDir(src)
    with atomic_dir(dst, overwrite=True) as tmp:
        write_sharded(tmp, ((k, s.get(k)) for k in s.keys()), 2 << 30)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    args = p.parse_args()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    nbytes = make_hf(root / "hf", args.layers, args.hidden)
    baseline(root / "hf", root / "warm")  # warm the page cache so every timed run reads from memory
    rows = []
    for name, fn in [("baseline (safetensors load+save)", lambda: baseline(root / "hf", root / "copy")),
                     ("hf-to-mcore", lambda: hf_to_mcore_checkpoint(root / "hf", root / "mc", progress=False)),
                     ("mcore-to-hf", lambda: mcore_to_hf_checkpoint(root / "mc", root / "back", progress=False))]:
        t = time.perf_counter()
        fn()
        rows.append((name, time.perf_counter() - t))
    base = rows[0][1]
    print(f"model: {nbytes / 1e6:.0f} MB fp32, {args.layers} layers, hidden {args.hidden}")
    print("| step | seconds | GB/s | time vs baseline |")
    print("|---|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.2f} | {nbytes / sec / 1e9:.2f} | {sec / base:.2f}x |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
