#!/usr/bin/env python
"""Peak transient memory of token log-probs + entropy for one sequence at a real vocabulary: the previous path (as of
11cf1b9) vs the vocab-parallel one (megatron/vocab_parallel.py), measured in one run on this machine.

    .venv/bin/python benchmarks/bench_logprob_memory.py [--tokens 5120] [--vocab 152064] [--dtype bfloat16]

The logits [tokens, vocab] (the output layer's, in the model's dtype) exist before either method runs; what is
measured is the peak resident memory ABOVE them while a method computes every token's log-prob of its target and
its entropy (forward, no autograd: the old/ref recomputation and the statistics; `--backward` adds the training
loss's backward for the new path). Each method runs in a fresh process; peak = Linux VmHWM after resetting it
through /proc/self/clear_refs, so the CPU allocator's large blocks (handed back to the OS) are seen.

Previous paths: the recomputation gathered the full vocabulary and ran log_softmax in fp32
(rollout/logprobs.py); the loss (rl/losses.py) upcast, log_softmax-ed, exponentiated and multiplied full [s, V]
fp32 tensors for the entropy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_method(method: str, tokens: int, vocab: int, dtype: str, backward: bool) -> dict:
    import time

    import torch

    torch.manual_seed(0)
    logits = (torch.randn(tokens, vocab) * 2).to(getattr(torch, dtype))
    targets = torch.randint(0, vocab, (tokens,))
    base = _vm("VmRSS:")
    _reset_peak()
    t0 = time.perf_counter()
    if method == METHODS[0]:
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    elif method == METHODS[1]:
        z = logits.float()
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
    else:
        from mgs_megatron.megatron.vocab_parallel import token_logprobs

        x = logits.requires_grad_(backward)
        logp, ent = token_logprobs(x[None], targets[None], vocab_size=vocab, group=False, vocab_start=0,
                                   need_entropy=method != METHODS[3])
        if backward:
            (logp.sum() + 0.01 * ent.sum()).backward()
    seconds = time.perf_counter() - t0
    peak = _vm("VmHWM:") - base
    return {"peak_bytes": peak, "seconds": seconds, "logits_bytes": logits.numel() * logits.element_size(),
            "check": float(logp.float().sum())}


METHODS = ["previous recompute (log-probs only): log_softmax of the full fp32 logits",
           "previous loss path (log-probs + entropy): logp_and_entropy, full fp32",
           "vocab-parallel, chunked (megatron/vocab_parallel.py)",
           "vocab-parallel, chunked, log-probs only (the old / reference recomputation)"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=5120)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--backward", action="store_true", help="also the new path's backward (training loss)")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.method:
        print(json.dumps(run_method(a.method, a.tokens, a.vocab, a.dtype, a.backward)))
        return 0
    rows = []
    methods = METHODS + (["vocab-parallel, forward + backward"] if a.backward else [])
    for m in methods:
        cmd = [sys.executable, __file__, "--tokens", str(a.tokens), "--vocab", str(a.vocab), "--dtype", a.dtype,
               "--method", METHODS[2] if m == "vocab-parallel, forward + backward" else m]
        if m == "vocab-parallel, forward + backward":
            cmd.append("--backward")
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append((m, json.loads(r.stdout.strip().splitlines()[-1])))
    new = rows[2][1]["peak_bytes"]
    loss_path = rows[1][1]["peak_bytes"]
    print(f"one sequence of {a.tokens} tokens, vocabulary {a.vocab}, logits in {a.dtype} "
          f"({rows[0][1]['logits_bytes'] / 2**30:.2f} GiB, not counted); log-probs of the targets + entropy")
    print()
    print("| method | peak transient (GiB) | x new | time (s) |")
    print("|---|---|---|---|")
    for m, r in rows:
        print(f"| {m} | {r['peak_bytes'] / 2**30:.2f} | {r['peak_bytes'] / max(new, 1):.1f} | {r['seconds']:.2f} |")
    print()
    print(f"new / previous loss path = {new / loss_path:.3f}; new / previous recompute = "
          f"{new / rows[0][1]['peak_bytes']:.3f}")
    checks = {m: r["check"] for m, r in rows}
    print()
    print("sum of the log-probs per method (the same numbers, up to fp32 rounding):",
          ", ".join(f"{v:.6g}" for v in checks.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
