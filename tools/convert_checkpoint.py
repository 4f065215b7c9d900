#!/usr/bin/env python
"""HF <-> Megatron checkpoint conversion (Llama 3.x, Qwen2/2.5, Qwen3).

  python tools/convert_checkpoint.py hf-to-mcore HF_DIR MCORE_DIR [--check --tp 2 --pp 2] [--overwrite]
  python tools/convert_checkpoint.py mcore-to-hf MCORE_DIR HF_DIR [--check --tp 1 --pp 2] [--overwrite]
  python tools/convert_checkpoint.py hf-to-torch-dist HF_DIR MLM_DIR [--iteration N] [--vocab-tp T] [--check ...]
  python tools/convert_checkpoint.py torch-dist-to-hf MLM_DIR HF_DIR [--hf-config HF_MODEL_DIR] [--check ...]

MLM_DIR is a Megatron-LM torch_dist checkpoint (latest_checkpointed_iteration.txt + iter_NNNNNNN/), as
Megatron-LM, verl and slime write it (see mgs_megatron/convert/torch_dist.py); one that mgs_megatron did not write
needs --hf-config, the HF directory of the model (config.json, tokenizer). Both directions stream one layer at a time.

The Megatron side is the "mgs-canonical-v1" checkpoint (see mgs_megatron/convert/canonical.py): conversion itself
is model-free and single-process; it loads into a model at any TP/PP with mgs_megatron.weights.load_weights.
--check compares fp32 logits of HF and Megatron (built at --tp x --pp, spawned gloo ranks on CPU) on a few prompts.
Output is written to a temp dir beside the target and renamed at the end: nothing is left on failure.
Errors (a missing or unsupported config, model_type and architectures that disagree, a missing or misshapen
tensor, an existing destination, a failed --check) are one line, `convert_checkpoint: error: ...`, exit 2;
--debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf", "hf-to-torch-dist", "torch-dist-to-hf"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination (atomically)")
    p.add_argument("--shard-size-mb", type=int, default=2048, help="max safetensors shard size")
    p.add_argument("--check", action="store_true", help="compare HF and Megatron logits after converting")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size for --check")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size for --check")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference for --check (fp32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="the traceback of an error, not one line")
    p.add_argument("--hf-config", default=None, help="torch-dist-to-hf: HF directory of the model (config, tokenizer)")
    p.add_argument("--iteration", type=int, default=0, help="hf-to-torch-dist: the iteration to write")
    p.add_argument("--vocab-tp", type=int, default=1,
                   help="hf-to-torch-dist: pad the vocabulary as Megatron-LM does for this TP (128 x TP)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return convert(args)
    except Exception as e:  # noqa: BLE001 - every failure here is about the input: one line, --debug for more
        if args.debug:
            raise
        from mgs_megatron.errors import ConfigError, ConversionError

        text = str(e).strip().splitlines()[-1] if str(e).strip() else ""  # a rank's report ends in its error
        kind = "" if isinstance(e, (ConfigError, ConversionError)) else f"{type(e).__name__}: "
        print(f"convert_checkpoint: error: {kind}{text}", file=sys.stderr)
        return 2


def convert(args) -> int:
    from mgs_megatron.convert import hf_to_mcore_checkpoint, mcore_to_hf_checkpoint
    from mgs_megatron.convert.canonical import read_model_config
    from mgs_megatron.convert.io import read_config
    from mgs_megatron.megatron.model import ParallelConfig
    from mgs_megatron.models import model_config_from_hf
    from mgs_megatron.weights.check import check_logits

    if args.check:  # the layout fits the model, before converting and before any rank starts
        src = model_config_from_hf(read_config(args.src)) if args.direction == "hf-to-mcore" else \
            read_model_config(args.src)
        ParallelConfig(args.tp, args.pp).check(src)
    kw = dict(overwrite=args.overwrite, progress=not args.quiet, max_shard_bytes=args.shard_size_mb << 20)
    t0 = time.perf_counter()
    if args.direction in ("hf-to-torch-dist", "torch-dist-to-hf"):
        from mgs_megatron.convert.torch_dist_convert import hf_to_torch_dist, torch_dist_to_hf

        if args.direction == "hf-to-torch-dist":
            cfg = hf_to_torch_dist(args.src, args.dst, iteration=args.iteration, tp=args.vocab_tp,
                                   overwrite=args.overwrite)
            hf_dir, mcore_dir = args.src, args.dst
        else:
            cfg = torch_dist_to_hf(args.src, args.dst, hf_config_dir=args.hf_config, overwrite=args.overwrite,
                                   max_shard_bytes=kw["max_shard_bytes"])
            hf_dir, mcore_dir = args.dst, args.src
    elif args.direction == "hf-to-mcore":
        cfg = hf_to_mcore_checkpoint(args.src, args.dst, **kw)
        hf_dir, mcore_dir = args.src, args.dst
    else:
        cfg = mcore_to_hf_checkpoint(args.src, args.dst, **kw)
        hf_dir, mcore_dir = args.dst, args.src
    print(f"{args.direction}: {cfg.architecture} {cfg.num_layers} layers -> {args.dst} "
          f"({time.perf_counter() - t0:.1f}s)")
    if args.check:
        diff = check_logits(hf_dir, mcore_dir, tp=args.tp, pp=args.pp, tol=args.tol)
        print(f"check: max |HF - Megatron| logit difference at tp={args.tp} pp={args.pp}: {diff:.3g} (tol {args.tol})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
