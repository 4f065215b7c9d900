"""RolloutEngine: one vLLM engine in this process, with prompt preparation, generation and in-place weight loads.

Where engines live (see __init__ docstring): without torch.distributed, a plain in-process engine; inside a
torch.distributed job, every rank builds one engine SPMD-style with vLLM's `external_launcher` backend
(vLLM reuses our process group: its world = ours, rollout TP = cfg.rollout_tp, rollout DP = world / rollout TP).
All ranks must then construct, generate, sync and close together (vLLM runs collectives across them).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterable, Optional, Sequence

import torch

from mgs_megatron.rollout.config import EngineInvalidError, Rollout, RolloutConfig, RolloutError
from mgs_megatron.rollout.prompts import Prompt, encode_prompt, fit_prompt

log = logging.getLogger(__name__)


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_CPU_BATCHED_TOKENS = 4096  # tokens per engine step on CPU (vLLM's default budget there)


def engine_kwargs(model_path: str, cfg: RolloutConfig, *, seed: int = 0, device: str = "cpu",
                  tokenizer: Optional[str] = None, logprobs_mode: str = "raw_logprobs") -> dict:
    """Keyword arguments of vllm.LLM for this process (CPU in-process, or SPMD external_launcher in a job)."""
    import torch.distributed as dist

    kw = dict(model=str(model_path), tokenizer=str(tokenizer or model_path), dtype=cfg.dtype,
              enforce_eager=cfg.eager(device), max_model_len=cfg.max_model_len, seed=seed,
              max_num_seqs=cfg.max_num_seqs, logprobs_mode=logprobs_mode,
              tensor_parallel_size=cfg.rollout_tp,
              use_tqdm_on_load=os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() in ("DEBUG", "INFO"))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world % cfg.rollout_tp:
            raise ValueError(f"world size {world} is not divisible by rollout_tp={cfg.rollout_tp}")
        # vLLM reuses our default process group (env:// from torchrun / the harness): one engine per rank.
        kw.update(distributed_executor_backend="external_launcher", data_parallel_size=world // cfg.rollout_tp)
    if device == "cpu":
        kw["kv_cache_memory_bytes"] = cfg.kv_cache_bytes
        # no chunked prefill on CPU: vLLM rewinds a seeded request's generator after a partial prefill, and CPU
        # generators have no offset ("CPU Generator does not use offset"); every prompt then fits one step's budget
        kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(cfg.max_model_len, _CPU_BATCHED_TOKENS))
    else:
        from mgs_megatron.rollout.gpu import gpu_engine_kwargs

        kw.update(gpu_engine_kwargs(cfg))
    kw.update(cfg.extra_engine_kwargs)
    return kw


def request_seed(base: int, step: int, prompt_index: int) -> int:
    """Seed of one request: independent of which rank / batch generates it, so results are reproducible."""
    return hash((base, step, prompt_index)) & 0x7FFFFFFF  # hash of an int tuple is not salted


class RolloutEngine:
    """One vLLM engine. `seed`: per-request seeds derive from (seed, step, global prompt index). `logprobs_mode`:
    the distribution of the log-probs it reports: "raw_logprobs" = softmax(logits), "processed_logprobs" =
    softmax(logits / temperature), the one sampled (top-p / top-k then renormalise it over the kept tokens)."""

    def __init__(self, model_path: str, cfg: RolloutConfig, *, seed: int = 0, device: str = "cpu",
                 tokenizer: Optional[str] = None, logprobs_mode: str = "raw_logprobs",
                 chat_template: Optional[str] = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: tensors pass by reference
        t0 = time.perf_counter()
        from transformers import AutoTokenizer
        from vllm import LLM

        self.cfg, self.seed, self.device, self.chat_template = cfg, seed, device, chat_template
        self.kwargs = engine_kwargs(model_path, cfg, seed=seed, device=device, tokenizer=tokenizer,
                                    logprobs_mode=logprobs_mode)
        try:
            self.llm = LLM(**self.kwargs)
        except Exception as e:  # noqa: BLE001 - surface vLLM's own message
            raise RolloutError(f"vLLM engine start failed for {model_path}: {type(e).__name__}: {e}") from e
        _quiet_per_sync_logs()
        self.tokenizer = AutoTokenizer.from_pretrained(self.kwargs["tokenizer"])
        self.version = 0            # 0 = the weights the engine started with
        self.invalid_reason: Optional[str] = None
        self.truncated_prompts = self.dropped_prompts = 0  # over-long prompts (rollout.prompt_truncation)
        self.start_seconds = time.perf_counter() - t0
        log.info("vLLM engine ready in %.1fs (%s)", self.start_seconds,
                 self.kwargs.get("distributed_executor_backend", "in-process"))

    # ------------------------------------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat_template)

    def prepare(self, prompts: Sequence[Prompt]) -> list[Optional[tuple[list[int], bool]]]:
        """(token ids, truncated) per prompt, None for a dropped one; over-long prompts follow
        cfg.prompt_truncation and are counted (truncated_prompts, dropped_prompts)."""
        out = []
        for i, p in enumerate(prompts):
            ids = self.encode(p)
            if not ids:
                raise RolloutError(f"prompt {i} is empty after tokenisation")
            fitted = fit_prompt(ids, self.cfg.max_prompt_len, self.cfg.prompt_truncation, i)
            self.truncated_prompts += fitted is not None and len(fitted) < len(ids)
            self.dropped_prompts += fitted is None
            out.append(None if fitted is None else (fitted, len(fitted) < len(ids)))
        return out

    def sampling_params(self, seed: int, **overrides):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        c = self.cfg
        kw = dict(n=c.n, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_tokens=c.max_response_len,
                  seed=seed, stop=list(c.stop) or None, stop_token_ids=list(c.stop_token_ids) or None,
                  ignore_eos=c.ignore_eos, logprobs=0,  # 0: the sampled token's logprob only
                  output_kind=RequestOutputKind.FINAL_ONLY)
        kw.update(overrides)
        return SamplingParams(**kw)

    # ------------------------------------------------------------------------------------------------ generate
    def check_valid(self) -> None:
        if self.invalid_reason is not None:
            raise EngineInvalidError(f"engine weights are invalid ({self.invalid_reason}); a full weight sync "
                                     f"must succeed before generating")

    def generate(self, prompts: Sequence[Prompt], *, step: int = 0, prompt_offset: int = 0,
                 **sampling_overrides) -> list[Rollout]:
        """n samples per prompt, ordered by (prompt, sample). prompt_offset: global index of prompts[0] (seeds)."""
        self.check_valid()
        prepared = self.prepare(prompts)
        engine = self.llm.llm_engine
        ids = {}
        try:
            for i, item in enumerate(prepared):
                if item is None:  # dropped (over-long, prompt_truncation='drop'): no samples
                    continue
                tok, _ = item
                g = prompt_offset + i
                params = self.sampling_params(request_seed(self.seed, step, g), **sampling_overrides)
                rid = f"s{step}-p{g}-{time.monotonic_ns()}"
                ids[rid] = i
                engine.add_request(rid, {"prompt_token_ids": tok}, params)
            outputs = self._run(engine, list(ids))
        except RolloutError:
            raise
        except Exception as e:  # noqa: BLE001 - an engine crash: keep vLLM's message
            raise RolloutError(f"vLLM generation failed: {type(e).__name__}: {e}") from e
        rollouts = []
        for rid, i in ids.items():
            tok, cut = prepared[i]
            for k, o in enumerate(outputs[rid].outputs):
                rollouts.append(_to_rollout(tok, o, prompt_offset + i, k, cut))
        return rollouts

    def _run(self, engine, rids: list[str]) -> dict:
        deadline = None if self.cfg.timeout_s is None else time.monotonic() + self.cfg.timeout_s
        done, timed_out = {}, False
        # has_unfinished_requests() is a collective across rollout-DP engines (external_launcher): every rank
        # keeps stepping until all are done, so the loop runs to the end even after a timeout (then raises).
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
            if deadline is not None and not timed_out and time.monotonic() > deadline:
                timed_out = True
                engine.abort_request([r for r in rids if r not in done])
        if timed_out:
            raise RolloutError(f"generation timed out after {self.cfg.timeout_s}s "
                               f"({len(done)}/{len(rids)} requests finished)")
        missing = [r for r in rids if r not in done]
        if missing:
            raise RolloutError(f"vLLM returned no output for {len(missing)} request(s), e.g. {missing[0]}")
        return done

    # ------------------------------------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors in place (fused groups must be complete). Does NOT reset the prefix cache."""
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(weights),
                                                               is_checkpoint_format=True))

    def refresh_tied_lm_head(self) -> bool:
        """Re-run the tied lm_head's post-load processing (see _refresh_tied_lm_head). True if it was tied."""
        return any(self.llm.collective_rpc(_refresh_tied_lm_head))

    def reset_prefix_cache(self) -> None:
        # Mandatory after every weight change: cached KV of old weights would otherwise be reused.
        if self.llm.reset_prefix_cache() is False:
            raise RolloutError("vLLM refused to reset the prefix cache (requests still running?)")

    def mark_invalid(self, reason: str) -> None:
        self.invalid_reason = reason

    def mark_synced(self, version: int) -> None:
        self.version, self.invalid_reason = version, None

    # ------------------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Shut the engine down without letting vLLM destroy OUR default process group (it would otherwise)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        import vllm.v1.engine.core as core

        original = core.cleanup_dist_env_and_memory
        core.cleanup_dist_env_and_memory = _cleanup_vllm_groups_only
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            core.cleanup_dist_env_and_memory = original
            self.llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _DropRotaryReloadWarning(logging.Filter):
    # vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every sync: its cos/sin cache is
    # no checkpoint weight, and vLLM puts the existing cache back (the sync tests check logprobs after a sync).
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and record.args[0] == "RotaryEmbedding" and "Failed to load" in record.msg)


def _quiet_per_sync_logs() -> None:
    """Keep vLLM's per-sync INFO lines (reload time, prefix-cache reset) and the warning above out of the logs."""
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _DropRotaryReloadWarning) for f in layerwise.filters):  # one per process, not engine
        layerwise.addFilter(_DropRotaryReloadWarning())
    for name in ("vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _refresh_tied_lm_head(worker) -> bool:
    """Runs inside the vLLM worker. With tied embeddings vLLM's lm_head shares embed_tokens' Parameter, but on CPU
    process_weights_after_loading packs a private copy of it for the GEMM (sgl/oneDNN). A reload only sends
    embed_tokens, so the lm_head module is never re-processed and would keep computing logits with the OLD packed
    weights (seen: Llama/Qwen3 tied models gave logprob diffs ~1.6 after sync). Re-processing it re-packs from the
    (already updated) shared Parameter. A no-op on GPU for unquantized weights."""
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or getattr(lm_head, "weight", None) is None:
        return False
    if lm_head.weight is not embed.weight and lm_head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


def _cleanup_vllm_groups_only() -> None:
    import gc

    from vllm.distributed import parallel_state as vps

    gc.unfreeze()
    vps.destroy_model_parallel()
    if vps._WORLD is not None:
        vps._WORLD.destroy()  # its own sub-groups; the default group stays ours
        vps._WORLD = None
    gc.collect()


def _to_rollout(prompt_ids: list[int], out, prompt_index: int, sample_index: int, cut: bool) -> Rollout:
    resp = list(out.token_ids)
    lps = out.logprobs or []
    if len(lps) != len(resp):
        raise RolloutError(f"vLLM returned {len(lps)} logprobs for {len(resp)} tokens")
    values = [float(pos[t].logprob) for pos, t in zip(lps, resp)]
    return Rollout(prompt_ids=list(prompt_ids), response_ids=resp, response_logprobs=values, text=out.text,
                   finish_reason=str(out.finish_reason), prompt_index=prompt_index, sample_index=sample_index,
                   prompt_truncated=cut, stop_reason=out.stop_reason)
