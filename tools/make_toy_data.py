#!/usr/bin/env python
"""Write the bundled toy data (no downloads): examples/data/{math,if,chat}.jsonl and examples/data/tokenizer/;
with --reward-model also the tiny trained chat reward model (examples/data/reward_model/, ~0.5 MB, ~10 s CPU).

    python tools/make_toy_data.py [--out examples/data] [--n 200] [--seed 0] [--reward-model]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgs_megatron.data.toy import build_toy_reward_model, build_toy_tokenizer, write_toy_data  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "examples" / "data"))
    ap.add_argument("--n", type=int, default=200, help="rows per domain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reward-model", action="store_true", help="also train and save the tiny chat RM")
    ap.add_argument("--rm-steps", type=int, default=60)
    args = ap.parse_args(argv)
    out = Path(args.out)
    for d, p in write_toy_data(out, args.n, args.seed).items():
        print(f"{d}: {p}")
    tok = build_toy_tokenizer(out / "tokenizer", seed=args.seed)
    print(f"tokenizer: {out / 'tokenizer'} (vocab {len(tok)})")
    if args.reward_model:
        print(f"reward model: {build_toy_reward_model(out / 'reward_model', tok, args.rm_steps, args.seed)}")


if __name__ == "__main__":
    main()
