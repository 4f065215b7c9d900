"""Pluggable rollout backends: `generate(prompts, n, step, temperature) -> list[Rollout]` and `sync_weights()`.

  vllm      mgs_megatron.rollout.RolloutEngine (one engine per rank, SPMD), started before the policy with dummy
            weights (start_vllm), in-place weight sync after each step, asleep on CUDA while Megatron trains.
  megatron  fallback without vLLM: token-by-token generation with the live Megatron model (full re-forward per
            token, no KV cache) -- fine for tiny models on CPU, and handy for tests.

Both return every rank the SAME global list of rollouts, ordered by (prompt, sample): generation is split over
ranks and the results are all-gathered (Python objects; fine at RL batch sizes).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.devices import HOST, compute_device
from mgs_megatron.rollout.config import Rollout, RolloutConfig
from mgs_megatron.rollout.distribute import split_range
from mgs_megatron.rollout.gpu import KV_CACHE, WEIGHTS, EngineMemory
from mgs_megatron.rollout.prompts import encode_prompt, fit_prompt
from mgs_megatron.rollout.sampling import sample_next

_CHECK_EVERY = 8  # tokens between host checks of "every row has stopped" (a device -> host sync each)


def _from_last_stage(tokens: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's tokens on every stage of the pipeline (one broadcast of b numbers)."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return tokens
    group = ps.get_pipeline_model_parallel_group()
    dist.broadcast(tokens, src=dist.get_global_rank(group, pp - 1), group=group)
    return tokens


def _gather(mine: list, keep_first_of: int = 1) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine if dist.get_rank() % keep_first_of == 0 else [])
    out = {(r.prompt_index, r.sample_index): r for part in parts for r in part}
    return [out[k] for k in sorted(out)]


class RolloutBackend:
    reports_logprobs = True  # Rollout.response_logprobs are the engine's own (rollout/logprob_diff is meaningful)

    def generate(self, prompts: Sequence, n: int, *, step: int, temperature: Optional[float] = None
                 ) -> list[Rollout]:
        raise NotImplementedError

    def sync_weights(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class MegatronBackend(RolloutBackend):
    """Generation with the Megatron model itself. Each DP rank generates a contiguous share of the prompts (its TP/PP
    peers run the same forwards); a sample's draws depend on (seed, step, prompt index, sample index, position)
    only, so results do not depend on the layout, the batch or a resume. Its rollouts carry no logprobs (the
    trainer recomputes them)."""

    reports_logprobs = False

    def __init__(self, cfg: RolloutConfig, chunks, tokenizer, vocab_size: int, *, seed: int, batch_size: int = 64,
                 chat_template: Optional[str] = None):
        self.cfg, self.chunks, self.tok, self.vocab_size = cfg, chunks, tokenizer, vocab_size
        self.seed, self.batch_size, self.chat_template = seed, batch_size, chat_template
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, prompt, index: int = 0) -> tuple[Optional[list[int]], bool]:
        """(token ids within max_prompt_len, whether they were truncated) under rollout.prompt_truncation, as in
        RolloutEngine.prepare; ids None: the prompt is dropped."""
        ids = encode_prompt(self.tok, [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
                            self.chat_template)
        fitted = fit_prompt(ids, self.cfg.max_prompt_len, self.cfg.prompt_truncation, index)
        return fitted, fitted is not None and len(fitted) < len(ids)

    @torch.no_grad()
    def _sample(self, prompt_ids: list[list[int]], seeds: list[int], temperature: float) -> list[list[int]]:
        """Responses of a batch of prompts: the whole batch on the compute device, one forward per token (no KV
        cache), next tokens drawn on the last pipeline stage (rollout/sampling.py) and broadcast to the others;
        the host learns whether every row has stopped once every `_CHECK_EVERY` tokens."""
        from mgs_megatron.megatron.forward import last_logits

        device, b, new = compute_device(), len(prompt_ids), self.cfg.max_response_len
        lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long, device=HOST)
        width = int(lengths.max())
        ids = torch.full((b, width + new), self.pad, dtype=torch.long, device=HOST)
        for i, p in enumerate(prompt_ids):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=HOST)
        ids, lengths = ids.to(device), lengths.to(device)
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=device)
        rows = torch.arange(b, device=device)
        out = torch.full((b, new), -1, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for t in range(new):
            z = last_logits(self.chunks, ids[:, :width + t], lengths + t, self.vocab_size)
            nxt = sample_next(z, temperature=temperature, top_p=self.cfg.top_p, seeds=seeds_t, step=t) \
                if z is not None else torch.empty(b, dtype=torch.long, device=device)
            nxt = _from_last_stage(nxt)
            out[:, t] = torch.where(done, -1, nxt)
            ids[rows, lengths + t] = torch.where(done, self.pad, nxt)
            done |= nxt == self.eos
            if (t + 1) % _CHECK_EVERY == 0 and bool(done.all()):
                break
        return [[tok for tok in row if tok >= 0] for row in out.tolist()]

    def generate(self, prompts, n, *, step, temperature=None):
        from megatron.core import parallel_state as ps

        from mgs_megatron.rollout.engine import request_seed

        temperature = self.cfg.temperature if temperature is None else temperature
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        lo, hi = split_range(len(prompts), dp, dp_rank)
        encoded, cut = {}, {}
        for g in range(lo, hi):
            encoded[g], cut[g] = self.encode(prompts[g], g)
        jobs = [(g, k) for g in range(lo, hi) if encoded[g] is not None for k in range(n)]
        mine = []
        # every DP rank runs the same number of batches (PP/TP peers share them; DP ranks are independent)
        for b in range(0, len(jobs), self.batch_size):
            batch = jobs[b:b + self.batch_size]
            resp = self._sample([encoded[g] for g, _ in batch],
                                [request_seed(self.seed, step, g) * 1000 + k for g, k in batch], temperature)
            for (g, k), r in zip(batch, resp):
                finish = "stop" if r and r[-1] == self.eos else "length"
                text = self.tok.decode([t for t in r if t != self.eos], skip_special_tokens=True)
                mine.append(Rollout(encoded[g], r, [0.0] * len(r), text, finish, g, k, prompt_truncated=cut[g]))
        return _gather(mine)


class VLLMBackend(RolloutBackend):
    """A vLLM engine per rank (rollout/engine.py). `start_vllm` builds it before the policy exists, with dummy
    weights, and puts it to sleep; `attach` gives it the policy's chunks. The policy's weights arrive by in-place sync
    (rollout/sync.py) before the first generation and after every optimizer step; on CUDA the engine sleeps while
    Megatron trains (the order of events is in rollout/gpu.py)."""

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, seed: int, device: str,
                 logprobs_mode: str = "processed_logprobs", chat_template: Optional[str] = None):
        from mgs_megatron.rollout.engine import RolloutEngine

        self.cfg, self.chunks, self.model_cfg = cfg, None, None
        # dummy weights: vLLM reads only config.json and the tokenizer from model_dir
        engine_cfg = replace(cfg, extra_engine_kwargs={"load_format": "dummy", **cfg.extra_engine_kwargs})
        with _rng_untouched(device):  # vLLM seeds torch's global RNGs; the trainer's own draws must not move
            self.engine = RolloutEngine(model_dir, engine_cfg, seed=seed, device=device, tokenizer=model_dir,
                                        logprobs_mode=logprobs_mode, chat_template=chat_template)
        self.engine.mark_invalid("dummy weights at start; the first weight sync loads the policy's")
        self.needs_sync = True
        self.weights_version = 0
        self.memory = EngineMemory(self.engine)
        self.memory.sleep(level=2)  # nothing worth keeping a host copy of

    def attach(self, chunks, model_cfg, weights_version: int = 0) -> "VLLMBackend":
        """Give the engine the policy's chunks; `weights_version`: the optimizer steps those weights hold (the
        resumed step), so that rollout/weights_version counts steps across a resume."""
        self.chunks, self.model_cfg, self.weights_version = chunks, model_cfg, weights_version
        return self

    def generate(self, prompts, n, *, step, temperature=None):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        tp = self.cfg.rollout_tp
        lo, hi = split_range(len(prompts), world // tp, rank // tp)
        msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts[lo:hi]]
        over = {"n": n}
        if temperature is not None:
            over["temperature"] = temperature
        self._awake()
        mine = self.engine.generate(msgs, step=step, prompt_offset=lo, **over)
        if self.memory.sleep():  # level 2: the weights are gone, the next wake re-syncs them
            self.needs_sync = True
        return _gather(mine, keep_first_of=tp)

    def sync_weights(self) -> dict:
        """After an optimizer step: wake (weights) -> weight sync -> wake (KV cache)."""
        self.needs_sync = True
        self.weights_version += 1
        return self._awake()

    def _awake(self) -> dict:
        self.memory.wake(WEIGHTS)
        metrics = self._sync() if self.needs_sync else {}
        self.memory.wake(KV_CACHE)
        return metrics

    def _sync(self) -> dict:
        from mgs_megatron.rollout.sync import sync_weights

        self.needs_sync = False  # a failed sync leaves the engine invalid (EngineInvalidError), it is not retried
        return sync_weights(self.engine, self.chunks, self.model_cfg, version=self.weights_version).as_metrics()

    def close(self) -> None:
        self.engine.close()


@contextmanager
def _rng_untouched(device: str):
    devices = [torch.cuda.current_device()] if device != "cpu" and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def start_vllm(cfg: RolloutConfig, *, seed: int, device: str, workdir: Path, hf_config: dict,
               hf_side_dir: Optional[str], logprob_temperature: float,
               chat_template: Optional[str] = None) -> Optional[VLLMBackend]:
    """The vLLM engine, started before the policy allocates anything (so that vLLM's start-up memory check and
    profiling see a free GPU) and asleep; None for the megatron backend. Every rank calls it. Its model directory
    `workdir`/rollout_engine holds only config.json and the tokenizer files (rank 0 writes it). It reports log-probs
    of the distribution the trainer's log-probs refer to (softmax(logits / logprob_temperature): the sampled one when
    that is the rollout temperature, else the raw logits' when it is 1)."""
    if cfg.backend != "vllm":
        return None
    from mgs_megatron.convert.io import atomic_dir, copy_side_files

    model_dir = Path(workdir) / "rollout_engine"
    if not dist.is_initialized() or dist.get_rank() == 0:
        with atomic_dir(model_dir, overwrite=True) as tmp:
            if hf_side_dir is not None:
                copy_side_files(Path(hf_side_dir), tmp)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if dist.is_initialized():
        dist.barrier()
    mode = "processed_logprobs" if logprob_temperature == cfg.temperature else "raw_logprobs"
    return VLLMBackend(cfg, str(model_dir), seed=seed, device=device, logprobs_mode=mode, chat_template=chat_template)


def build_backend(cfg: RolloutConfig, *, started: Optional[VLLMBackend], chunks, model_cfg, tokenizer, seed: int,
                  chat_template: Optional[str] = None, weights_version: int = 0) -> RolloutBackend:
    """The configured backend: the vLLM engine from `start_vllm` given the policy's chunks (holding
    `weights_version` optimizer steps), or the Megatron sampler."""
    if cfg.backend == "megatron":
        return MegatronBackend(cfg, chunks, tokenizer, model_cfg.vocab_size, seed=seed, chat_template=chat_template)
    return started.attach(chunks, model_cfg, weights_version)
