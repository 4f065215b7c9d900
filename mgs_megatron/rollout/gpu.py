"""GPU-only parts of the rollout stage (NOT tested on the CPU machine; written from vLLM 0.32's source and docs).

Layout on GPU: torchrun starts the training ranks; every rank builds a RolloutEngine (engine_kwargs selects
vLLM's `external_launcher` backend whenever torch.distributed is initialised): vLLM reuses the job's process
group, rollout TP = RolloutConfig.rollout_tp (any divisor of the world size, independent of Megatron's TP),
rollout DP = world / rollout_tp, one engine per rollout-DP group (its TP ranks run the same requests
deterministically, VLLM_ENABLE_V1_MULTIPROCESSING=0 is forced by vLLM for this backend).
Memory: with enable_sleep_mode the engine's weights and KV cache are released while Megatron trains:

    engine.llm.sleep(level=1)           # after generation: weights offloaded to CPU, KV cache freed
    ... Megatron forward/backward/optimizer step ...
    with awake_for_sync(engine):        # wake weights only, sync, then KV cache
        sync_weights(engine, chunks, cfg)

Level 2 (discard weights) would also be correct here, since every sync rewrites all weights; level 1 is the safe
default. Sleep mode is a no-op on CPU vLLM (it logs and returns).
"""

from __future__ import annotations

from contextlib import contextmanager

from mgs_megatron.rollout.config import RolloutConfig


def gpu_engine_kwargs(cfg: RolloutConfig) -> dict:
    return dict(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode)


def sleep(engine, level: int = 1) -> None:
    """Release the engine's GPU memory before training (requires enable_sleep_mode=True)."""
    if engine.cfg.enable_sleep_mode and engine.device != "cpu":
        engine.reset_prefix_cache()
        engine.llm.sleep(level=level)


@contextmanager
def awake_for_sync(engine):
    """Wake the weights first (so the sync has somewhere to write), then the KV cache after the sync."""
    asleep = engine.cfg.enable_sleep_mode and engine.device != "cpu"
    if asleep:
        engine.llm.wake_up(tags=["weights"])
    try:
        yield engine
    finally:
        if asleep:
            engine.llm.wake_up(tags=["kv_cache"])
