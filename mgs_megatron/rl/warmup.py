"""Supervised warm-up on noisy toy demonstrations, so that GRPO starts from a policy that sometimes succeeds.

RL from a random init learns nothing (a random policy almost never earns a reward); real RL starts from a base or
SFT model. Here a short SFT (Megatron's forward_backward + a Megatron Adam, world = the trainer's) on demonstrations
built from the prompts themselves:

    math  "\\boxed{ANSWER}"; a `noise` fraction gets a wrong answer
    if    a short answer built to follow the row's IFEval instructions (case, commas, length, ending, title,
          keyword, quotes); a `noise` fraction gets a chat-style answer that breaks them
    chat  `toy.chat_pair`'s preferred response; a `noise` fraction gets the rejected one

The result is cached as a canonical checkpoint in a directory keyed by a hash of the warm-up + model config, so
only the first run pays for it. `maybe_warmup(...)` is the trainer's single entry point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from mgs_megatron.data import pack_sequences

log = logging.getLogger("mgs_megatron.rl.warmup")


# ================================================================================================ demonstrations
def math_demo(row: dict, rng: random.Random, noisy: bool) -> str:
    ans = int(row["answer"]) if str(row["answer"]).lstrip("-").isdigit() else row["answer"]
    if noisy:
        ans = ans + rng.choice([-3, -2, -1, 1, 2, 3, 10]) if isinstance(ans, int) else f"{ans}0"
    return f"\\boxed{{{ans}}}"


def if_demo(row: dict, rng: random.Random, noisy: bool) -> str:
    """A response that follows every instruction of the row (or, noisy, a chat-style one that breaks most)."""
    prompt = row["prompt"]
    topic = prompt.split("Say something about ", 1)[-1].split(".", 1)[0] if "Say something about " in prompt \
        else "things"
    ids = list(row.get("instruction_id_list", []))
    kws = {iid: (kw or {}) for iid, kw in zip(ids, row.get("kwargs", []))}
    if noisy:
        return rng.choice([f"Hello, {topic} are great, thank you!", f"Well, {topic}, {topic}, and more, sure!",
                           f"Sure, I can talk about {topic}, of course, it is lovely!"])
    end = kws.get("startend:end_checker", {}).get("end_phrase")
    short = "length_constraints:number_words" in ids
    # (IFEval's case checks run langdetect, which needs a few real English words; these pass for every topic)
    body = rng.choice([f"I think {topic} are the best.", f"The best is {topic}."])
    if short:
        body = f"{topic.capitalize()}." if end else f"The best is {topic}."
    parts = []
    if "detectable_format:title" in ids:
        parts.append(f"<<{topic}>>")
    parts.append(body)
    if end:
        parts.append(end)
    text = " ".join(parts)
    if "startend:quotation" in ids:
        text = f"\"{text}\""
    if "change_case:english_capital" in ids:
        text = text.upper()
    elif "change_case:english_lowercase" in ids:
        text = text.lower()
    return text


def chat_demo(row: dict, rng: random.Random, noisy: bool) -> str:
    from mgs_megatron.data.toy import chat_pair

    good, bad = chat_pair(row["prompt"], rng)
    return bad if noisy else good


DEMO_BUILDERS = {"math": math_demo, "if": if_demo, "chat": chat_demo}


def build_demonstrations(rows: Sequence[dict], noise: float, seed: int, copies: int = 1) -> list[dict]:
    """[{domain, prompt, response, noisy}] for rows of the toy domains (others are skipped); deterministic in seed.
    `copies` draws that many demonstrations per row (fresh noise / phrasing each)."""
    rng = random.Random(seed)
    out = []
    for c in range(copies):
        for row in rows:
            fn = DEMO_BUILDERS.get(row.get("domain"))
            if fn is None:
                continue
            noisy = rng.random() < noise
            out.append({"domain": row["domain"], "prompt": row["prompt"], "response": fn(row, rng, noisy),
                        "noisy": noisy, "row": row})
    return out


def encode_demo(tokenizer, demo: dict, max_prompt_len: int, max_response_len: int) -> tuple[list[int], int]:
    """(token ids of prompt + response + eos, prompt length), tokenized as the rollout backends do."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": demo["prompt"]}], add_generation_prompt=True,
                                         tokenize=False)
    p = list(tokenizer(text, add_special_tokens=False)["input_ids"])[-max_prompt_len:]
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
        st = torch.stack([o["lm_loss"] for o in outs]).sum(0).double() if outs else torch.zeros(2, dtype=torch.float64)
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
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from transformers import AutoTokenizer

    from mgs_megatron.convert import save_checkpoint
    from mgs_megatron.convert.checkpoint import META
    from mgs_megatron.megatron.model import build_gpt_model
    from mgs_megatron.megatron.optim import build_optimizer, wrap_ddp
    from mgs_megatron.megatron.schedule import configure_grad_sync
    from mgs_megatron.rl import checkpoint as ckpt

    w = cfg.warmup
    if w.steps <= 0:
        return None
    if cfg.run.resume == "auto" and ckpt.latest(Path(cfg.run.output_dir) / "checkpoints") is not None:
        return None
    path = cache_dir(cfg)
    if (path / META).exists():  # written last (the directory appears atomically anyway)
        if dist.get_rank() == 0:
            print(f"[warm-up] cached: {path}", flush=True)
        return path

    t0 = time.perf_counter()
    tok_dir = cfg.model.tokenizer or cfg.model.path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    val_n = cfg.data.val_holdout if not cfg.data.val_sources else 0  # the trainer's split: no held-out prompt
    rows = [p.fields | {"domain": p.domain, "prompt": p.prompt or p.as_messages()[-1]["content"]}
            for v in train_rows.values() for p in (v[:-val_n] if val_n and len(v) > 2 * val_n else v)]
    demos = build_demonstrations(rows, w.noise, seed=cfg.run.seed, copies=4)
    encoded = [encode_demo(tokenizer, d, cfg.rollout.max_prompt_len, cfg.rollout.max_response_len) for d in demos]

    model = build_gpt_model(model_cfg, layout, precision)
    load_initial_weights([model])
    chunks = wrap_ddp([model], DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optim.use_distributed_optimizer), device=device)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=w.lr, weight_decay=0.0, clip_grad=1.0,
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer, bf16=precision.params_dtype == torch.bfloat16,
        params_dtype=precision.params_dtype))
    configure_grad_sync(chunks)
    per_rank = -(-w.batch_size // ps.get_data_parallel_world_size())  # the whole DP share in one micro-batch
    losses = run_sft(chunks, optimizer, encoded, steps=w.steps, batch_size=w.batch_size,
                     micro_batch_size=max(cfg.optim.micro_batch_size, per_rank), lr=w.lr, seed=cfg.run.seed,
                     pad=tokenizer.pad_token_id or 0)
    save_checkpoint(chunks, model_cfg, path, hf_config=hf_config, hf_side_dir=tok_dir, overwrite=True,
                    progress=False)
    if dist.get_rank() == 0:
        print(f"[warm-up] {w.steps} steps on {len(demos)} demonstrations (noise {w.noise}): loss "
              f"{losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - t0:.0f}s; cached at {path}", flush=True)
    del chunks, optimizer, model
    return path
