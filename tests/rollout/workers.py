"""Rank-side helpers for the rollout tests (module level: the harness imports them in spawned ranks)."""

from __future__ import annotations

import torch

from tests.rollout import models


def build_megatron(mcore_dir: str, *, train: bool = False):
    """(ModelConfig, raw chunks, ddp chunks or None, optimizer or None) loaded from a converted checkpoint."""
    from megatron.core import parallel_state as ps

    from mgs_megatron.convert import read_model_config
    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.weights import load_weights

    cfg = read_model_config(mcore_dir)
    par = ParallelConfig(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    chunks = [build_gpt_model(cfg, par)]
    load_weights(chunks, mcore_dir)
    if not train:
        return cfg, chunks, None, None
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from mgs_megatron.megatron.optim import build_optimizer, wrap_ddp
    from mgs_megatron.megatron.schedule import configure_grad_sync

    ddp = wrap_ddp(chunks, DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    opt = build_optimizer(ddp, OptimizerConfig(optimizer="adam", lr=2e-2, clip_grad=1.0))
    configure_grad_sync(ddp)
    return cfg, chunks, ddp, opt


def train_step(ddp, opt, rollouts) -> None:
    """One LM step on the rollouts' response tokens (just to move the weights)."""
    from mgs_megatron.megatron.optim import zero_grads
    from mgs_megatron.megatron.schedule import forward_backward

    width = max(len(r.sequence) for r in rollouts)
    tokens = torch.zeros(len(rollouts), width, dtype=torch.long)
    mask = torch.zeros(len(rollouts), width)
    for i, r in enumerate(rollouts):
        tokens[i, :len(r.sequence)] = torch.tensor(r.sequence)
        mask[i, len(r.prompt_ids) - 1:len(r.sequence) - 1] = 1.0
    labels = torch.roll(tokens, -1, dims=1)
    zero_grads(ddp, opt)
    forward_backward(ddp, [dict(tokens=tokens, labels=labels, loss_mask=mask)], num_microbatches=1,
                     seq_length=width, micro_batch_size=len(rollouts))
    ok, _, _ = opt.step()
    assert ok


def diff(engine_chunks, cfg, rollouts) -> dict:
    from mgs_megatron.rollout import logprob_diff, rollout_logprobs

    return logprob_diff(rollouts, rollout_logprobs(engine_chunks, rollouts, cfg.vocab_size))


def summary(rollouts) -> list:
    return [(r.prompt_index, r.sample_index, r.response_ids, r.finish_reason) for r in rollouts]


def sync_check_worker(engine_dir: str, mcore_dir: str, extended: bool = False) -> dict:
    """Engine starts from other weights; sync; generate; train a step; sync again; (extended) failure paths."""
    import dataclasses

    import torch.distributed as dist

    from mgs_megatron.rollout import (
        EngineInvalidError,
        PromptTooLongError,
        RolloutConfig,
        RolloutEngine,
        RolloutError,
        generate_distributed,
        sync_weights,
    )

    cfg, chunks, ddp, opt = build_megatron(mcore_dir, train=True)
    rcfg = RolloutConfig(max_prompt_len=64, max_response_len=10, n=2, kv_cache_bytes=32 << 20,
                         prompt_truncation="error", sync_bucket_bytes=256 << 10)
    out = {"rank": dist.get_rank()}
    engine = RolloutEngine(engine_dir, rcfg, seed=5)
    try:
        gen = lambda step: generate_distributed(engine, models.PROMPTS, step=step)  # noqa: E731
        r0 = gen(0)
        out["before_sync"] = diff(chunks, cfg, r0)
        s1 = sync_weights(engine, chunks, cfg)
        out["sync1"] = dataclasses.asdict(s1)
        r1 = gen(1)
        out["after_sync"] = diff(chunks, cfg, r1)
        out["count"] = len(r1)
        out["finish_reasons"] = sorted({r.finish_reason for r in r1})
        out["texts"] = [r.text for r in r1]
        r1b = gen(1)
        out["reproducible"] = (summary(r1) == summary(r1b)
                               and all(a.response_logprobs == b.response_logprobs for a, b in zip(r1, r1b)))
        out["rollouts"] = summary(r1)
        train_step(ddp, opt, r1)
        out["stale_after_step"] = diff(chunks, cfg, r1)  # vLLM still has the old weights
        s2 = sync_weights(engine, chunks, cfg)
        out["sync2"] = dataclasses.asdict(s2)
        r2 = gen(1)
        out["after_sync2"] = diff(chunks, cfg, r2)
        out["changed"] = any(a.response_logprobs != b.response_logprobs for a, b in zip(r1, r2))
        if extended:
            out.update(_failure_paths(engine, chunks, cfg, rcfg, gen, sync_weights, RolloutError,
                                      EngineInvalidError, PromptTooLongError))
    finally:
        engine.close()
    return out


def _failure_paths(engine, chunks, cfg, rcfg, gen, sync_weights, RolloutError, EngineInvalidError,
                   PromptTooLongError) -> dict:
    import dataclasses

    res = {}
    original, calls = engine.load_weights, []

    def flaky(weights):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in bucket 2")
        original(weights)

    engine.load_weights = flaky
    try:
        sync_weights(engine, chunks, cfg)
    except RolloutError as e:
        res["sync_failure"] = str(e)
    finally:
        engine.load_weights = original
    try:
        gen(2)
    except EngineInvalidError as e:
        res["generate_when_invalid"] = str(e)
    sync_weights(engine, chunks, cfg)
    res["after_recovery"] = diff(chunks, cfg, gen(2))
    long_prompt = list(range(10, 90))
    try:
        engine.generate([long_prompt])
    except PromptTooLongError as e:
        res["overlong_error"] = str(e)
    engine.cfg = dataclasses.replace(rcfg, prompt_truncation="left")
    r = engine.generate([long_prompt])
    res["truncated"] = (r[0].prompt_truncated, len(r[0].prompt_ids), engine.truncated_prompts, len(r))
    try:
        engine.generate([[10_000, 3]])  # token id outside the vocabulary: vLLM rejects it
    except RolloutError as e:
        res["bad_token_error"] = str(e)
    engine.cfg = dataclasses.replace(rcfg, timeout_s=0.0, max_response_len=8)
    try:
        engine.generate(models.PROMPTS)
    except RolloutError as e:
        res["timeout_error"] = str(e)
    engine.cfg = rcfg
    res["after_errors"] = diff(chunks, cfg, engine.generate(models.PROMPTS, step=3))
    return res


def over_budget_worker(engine_dir: str) -> list:
    """Seeded generation of more prompt tokens than one engine step takes (budget 128 tokens, 12 prompts of ~40):
    vLLM would prefill some prompts in chunks; returns two generations' token ids."""
    from mgs_megatron.rollout import RolloutConfig, RolloutEngine

    cfg = RolloutConfig(max_prompt_len=64, max_response_len=4, n=2, kv_cache_bytes=32 << 20, max_num_seqs=16,
                        extra_engine_kwargs={"max_num_batched_tokens": 128})
    engine = RolloutEngine(engine_dir, cfg, seed=3)
    try:
        prompts = [[{"role": "user", "content": "tea and the sea " * 8 + str(i)}] for i in range(12)]
        assert sum(len(ids) for ids, _ in engine.prepare(prompts)) > 3 * 128
        return [[r.response_ids for r in engine.generate(prompts, step=0)] for _ in range(2)]
    finally:
        engine.close()
