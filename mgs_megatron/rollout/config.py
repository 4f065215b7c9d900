"""Dataclasses of the rollout stage: the config, one generated sample, sync statistics, and the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


class RolloutError(RuntimeError):
    """vLLM failed (crash, timeout, bad request); the message carries the engine's own message."""


class PromptTooLongError(RolloutError, ValueError):
    """A prompt is longer than RolloutConfig.max_prompt_len and overlong='error'."""


class EngineInvalidError(RolloutError):
    """The engine's weights are not a complete, known version (a weight sync failed part-way)."""


@dataclass(frozen=True)
class RolloutConfig:
    max_prompt_len: int = 256
    max_response_len: int = 128
    n: int = 1                      # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1: off
    seed: int = 0                   # per-request seeds derive from (seed, step, global prompt index)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    kv_cache_bytes: int = 256 << 20
    dtype: str = "float32"          # float32 for exactness checks; bfloat16 for real runs
    enforce_eager: bool = True      # CPU: no torch.compile (55 s start-up otherwise)
    overlong: str = "error"         # "error" | "truncate" (keep the LAST max_prompt_len tokens; counted)
    rollout_tp: int = 1             # vLLM tensor parallel size (independent of Megatron's TP)
    sync_bucket_bytes: int = 256 << 20
    timeout_s: Optional[float] = None   # generation deadline; None = no limit
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.5  # GPU only
    enable_sleep_mode: bool = False      # GPU only (CPU vLLM ignores sleep())
    extra_engine_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.overlong not in ("error", "truncate"):
            raise ValueError(f"overlong={self.overlong!r}: expected 'error' or 'truncate'")
        for name in ("max_prompt_len", "max_response_len", "n", "rollout_tp", "sync_bucket_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} / top_p={self.top_p} out of range")

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
