"""Supervised warm-up on noisy toy demonstrations, so that GRPO starts from a policy that sometimes succeeds.

RL from a random init learns nothing (a random policy almost never earns a reward); real RL starts from a base or
SFT model. Here a short SFT (Megatron's forward_backward + a Megatron Adam, world = the trainer's) on demonstrations
built from the prompts themselves (data/toy.py `build_demonstrations`: a right answer, or with probability `noise`
a wrong / rule-breaking / rejected one).

The result is cached as a canonical checkpoint in a directory keyed by a hash of the warm-up + model config, so
only the first run pays for it. `maybe_warmup(...)` is the trainer's single entry point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mgs_megatron.devices import collective_device
from mgs_megatron.megatron.schedule import pack_sequences
from mgs_megatron.rollout.prompts import encode_prompt

log = logging.getLogger("mgs_megatron.rl.warmup")


@dataclass
class WarmupConfig:
    """Supervised warm-up on noisy toy demonstrations before RL (the toy domains only; 0 steps = none)."""

    steps: int = 0
    """SFT steps (0: no warm-up)."""
    lr: float = 3e-3
    """Peak learning rate, decayed linearly to 10%."""
    batch_size: int = 32
    """Demonstrations per step over all ranks."""
    noise: float = 0.3
    """Fraction of wrong / rule-breaking demonstrations (leaves room for RL to improve)."""
    cache: str = ""
    """Directory of the cached result ('': <output_dir>/../warmup-<hash of the settings>)."""


def encode_demo(tokenizer, demo: dict, max_prompt_len: int, max_response_len: int,
                chat_template: Optional[str] = None) -> tuple[list[int], int]:
    """(token ids of prompt + response + eos, prompt length), the prompt encoded as the rollout backends do."""
    p = encode_prompt(tokenizer, [{"role": "user", "content": demo["prompt"]}], chat_template)[-max_prompt_len:]
    r = list(tokenizer(demo["response"], add_special_tokens=False)["input_ids"])[:max_response_len - 1]
    return p + r + [tokenizer.eos_token_id], len(p)


# ================================================================================================ cache key
def cache_dir(cfg) -> Path:
    w = cfg.warmup
    key = {"warmup": {k: v for k, v in vars(w).items() if k != "cache"}, "model": cfg.model.hf_config,
           "path": cfg.model.path, "init": cfg.model.init_checkpoint, "tokenizer": cfg.model.tokenizer,
           "dtype": cfg.model.params_dtype, "sources": cfg.data.sources, "val": [cfg.data.val_holdout,
                                                                                  cfg.data.val_sources],
           "lens": [cfg.rollout.max_prompt_len, cfg.rollout.max_response_len], "seed": cfg.run.seed}
    if cfg.data.chat_template:  # (only when set: earlier caches keep their names)
        key["chat_template"] = cfg.data.chat_template
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = Path(w.cache) if w.cache else Path(cfg.run.output_dir).resolve().parent
    return root / f"warmup-{h}"


# ================================================================================================ the SFT loop
def run_sft(chunks, optimizer, encoded: list[tuple[list[int], int]], *, steps: int, batch_size: int,
            micro_batch_size: int, lr: float, seed: int, pad: int, log_every: int = 50) -> list[float]:
    """`steps` SFT steps (global batch `batch_size`, split over DP ranks) with linear LR decay to 10%; returns the
    per-step token-mean loss (on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mgs_megatron.megatron.optim import zero_grads
    from mgs_megatron.megatron.schedule import forward_backward, sum_reported

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    for c in chunks:
        c.train(True)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = lr * (1.0 - 0.9 * step / max(1, steps))
        if len(order) < batch_size:
            perm = list(range(len(encoded)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        mine = [encoded[i] for i in idx[dp_rank::dp]]
        seq_len = max(len(encoded[i][0]) for i in idx) - 1
        mbs = [pack_sequences(mine[k:k + micro_batch_size], micro_batch_size, seq_len, pad, target_key="labels")
               for k in range(0, len(mine), micro_batch_size)]
        zero_grads(chunks, optimizer)
        outs = forward_backward(chunks, mbs, num_microbatches=len(mbs), seq_length=seq_len,
                                micro_batch_size=micro_batch_size)
        optimizer.step()
        st = torch.zeros(2, dtype=torch.float64, device=collective_device())
        if outs:
            st += torch.stack([o["lm_loss"] for o in outs]).sum(0).double().to(st.device)
        sum_reported(st)
        losses.append(float(st[0] / st[1].clamp_min(1)))
        if dist.get_rank() == 0 and (step + 1) % log_every == 0:
            print(f"[warm-up] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return losses


def maybe_warmup(cfg, train_rows: dict, *, model_cfg, hf_config: dict, layout, precision, device: str,
                 load_initial_weights) -> Optional[Path]:
    """The warm-up checkpoint to start from (training and caching it on the first run), or None when
    `warmup.steps` is 0 or the run resumes from an RL checkpoint. Every rank calls this."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from mgs_megatron.convert import is_canonical
    from mgs_megatron.data.templates import resolve_chat_template
    from mgs_megatron.data.toy import build_demonstrations
    from mgs_megatron.megatron.model import build_gpt_model
    from mgs_megatron.megatron.optim import make_trainable
    from mgs_megatron.rl import resume
    from mgs_megatron.weights import save_weights

    w = cfg.warmup
    if w.steps <= 0:
        return None
    if cfg.run.resume == "auto" and resume.latest(Path(cfg.run.output_dir) / "checkpoints") is not None:
        return None
    path = cache_dir(cfg)
    if is_canonical(path):  # its metadata is written last (the directory appears atomically anyway)
        if dist.get_rank() == 0:
            print(f"[warm-up] cached: {path}", flush=True)
        return path

    t0 = time.perf_counter()
    tok_dir = cfg.model.tokenizer or cfg.model.path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rows = [p.fields | {"domain": p.domain, "prompt": p.prompt or p.as_messages()[-1]["content"]}
            for v in train_rows.values() for p in v]
    demos = build_demonstrations(rows, w.noise, seed=cfg.run.seed, copies=4)
    template = resolve_chat_template(cfg.data.chat_template)
    encoded = [encode_demo(tokenizer, d, cfg.rollout.max_prompt_len, cfg.rollout.max_response_len, template)
               for d in demos]

    model = build_gpt_model(model_cfg, layout, precision, device=device)
    load_initial_weights([model])
    chunks, optimizer = make_trainable([model], cfg.optim, params_dtype=precision.params_dtype, device=device,
                                       lr=w.lr, weight_decay=0.0)
    per_rank = -(-w.batch_size // ps.get_data_parallel_world_size())  # the whole DP share in one micro-batch
    losses = run_sft(chunks, optimizer, encoded, steps=w.steps, batch_size=w.batch_size,
                     micro_batch_size=max(cfg.optim.micro_batch_size, per_rank), lr=w.lr, seed=cfg.run.seed,
                     pad=tokenizer.pad_token_id or 0)
    save_weights(chunks, model_cfg, path, hf_config=hf_config, hf_side_dir=tok_dir, overwrite=True)
    if dist.get_rank() == 0:
        print(f"[warm-up] {w.steps} steps on {len(demos)} demonstrations (noise {w.noise}): loss "
              f"{losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - t0:.0f}s; cached at {path}", flush=True)
    del chunks, optimizer, model
    return path
