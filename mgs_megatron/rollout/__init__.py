"""Rollout stage: vLLM generation with in-place Megatron -> vLLM weight sync.

  config      RolloutConfig, Rollout (one sample), SyncStats, errors (RolloutError, PromptTooLongError,
              EngineInvalidError)
  engine      RolloutEngine: builds the vLLM engine (CPU: in-process; inside a torch.distributed job: one engine
              per rank via `external_launcher`), prompt preparation (text / chat messages / token ids, the
              prompt_truncation policy), seeded generation with per-token logprobs, in-place weight loads, close()
  sync        sync_weights(engine, chunks, model_cfg): streamed, bucketed, all-or-invalid
  distribute  generate_distributed(engine, prompts): split prompts over engines, every rank gets the rollouts
              of its Megatron DP rank
  logprobs    rollout_logprobs / logprob_diff (the rollout/logprob_diff metric, engine vs Megatron)
  gpu         vLLM and Megatron on the same GPUs: CUDA engine arguments, the engine's sleep / wake state
  backends    the trainer's rollout backends (vllm: engine started before the policy + sync + sleep / wake;
              megatron: token-by-token fallback), start_vllm, build_backend

Engine placement (CPU and GPU alike): every rank of the job holds an engine. vLLM, when it finds
torch.distributed already initialised, builds its groups from OUR default process group with collectives over
all ranks, so an engine on rank 0 only would hang; external_launcher makes this the intended SPMD mode. All
ranks must therefore construct, generate, sync and close together.
"""

from mgs_megatron.rollout.config import (
                                         EngineInvalidError,
                                         PromptTooLongError,
                                         Rollout,
                                         RolloutConfig,
                                         RolloutError,
                                         SyncStats,
)
from mgs_megatron.rollout.distribute import generate_distributed, split_range
from mgs_megatron.rollout.engine import RolloutEngine, engine_kwargs, request_seed
from mgs_megatron.rollout.logprobs import logprob_diff, rollout_logprobs
from mgs_megatron.rollout.sync import sync_weights

__all__ = ["EngineInvalidError", "PromptTooLongError", "Rollout", "RolloutConfig", "RolloutEngine", "RolloutError",
           "SyncStats", "engine_kwargs", "generate_distributed", "logprob_diff",
           "request_seed", "rollout_logprobs", "split_range", "sync_weights"]
