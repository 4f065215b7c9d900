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

from mgs_megatron.rollout.config import Rollout, RolloutConfig
from mgs_megatron.rollout.distribute import split_range
from mgs_megatron.rollout.gpu import KV_CACHE, WEIGHTS, EngineMemory


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
    peers run the same forwards); seeds depend on (seed, step, prompt index) only, so results do not depend on the
    layout or on a resume. Its rollouts carry no logprobs (the trainer recomputes them)."""

    reports_logprobs = False

    def __init__(self, cfg: RolloutConfig, chunks, tokenizer, vocab_size: int, *, seed: int, batch_size: int = 64):
        self.cfg, self.chunks, self.tok, self.vocab_size = cfg, chunks, tokenizer, vocab_size
        self.seed, self.batch_size = seed, batch_size
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        text = self.tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return ids[-self.cfg.max_prompt_len:]

    @torch.no_grad()
    def _sample(self, prompt_ids: list[list[int]], seeds: list[int], temperature: float) -> list[list[int]]:
        from mgs_megatron.megatron.forward import megatron_logits

        gens = [torch.Generator().manual_seed(s) for s in seeds]
        seqs = [list(p) for p in prompt_ids]
        out = [[] for _ in seqs]
        done = [False] * len(seqs)
        modes = [m.training for m in self.chunks]
        try:
            for _ in range(self.cfg.max_response_len):
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
                for i, s in enumerate(seqs):
                    ids[i, :len(s)] = torch.tensor(s)
                logits = megatron_logits(self.chunks, ids, self.vocab_size)
                if logits is None:  # not the last pipeline stage: receive the tokens below
                    logits = torch.zeros(len(seqs), width, self.vocab_size)
                nxt = []
                for i, s in enumerate(seqs):
                    z = logits[i, len(s) - 1].float()
                    if temperature <= 0:
                        t = int(z.argmax())
                    else:
                        p = torch.softmax(z / temperature, -1)
                        if self.cfg.top_p < 1:
                            sp, si = p.sort(descending=True)
                            cut = sp.cumsum(0) - sp > self.cfg.top_p
                            sp[cut] = 0
                            p = torch.zeros_like(p).scatter_(0, si, sp)
                        t = int(torch.multinomial(p, 1, generator=gens[i]))
                    nxt.append(t)
                nxt = self._share_from_last_stage(nxt)
                for i, t in enumerate(nxt):
                    if done[i]:
                        continue
                    out[i].append(t)
                    seqs[i].append(t)
                    if t == self.eos:
                        done[i] = True
                if all(done):
                    break
        finally:
            for m, mode in zip(self.chunks, modes):
                m.train(mode)
        return out

    @staticmethod
    def _share_from_last_stage(tokens: list[int]) -> list[int]:
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return tokens
        group = ps.get_pipeline_model_parallel_group()
        box = [tokens]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, ps.get_pipeline_model_parallel_world_size()
                                                                  - 1), group=group)
        return box[0]

    def generate(self, prompts, n, *, step, temperature=None):
        from megatron.core import parallel_state as ps

        from mgs_megatron.rollout.engine import request_seed

        temperature = self.cfg.temperature if temperature is None else temperature
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        lo, hi = split_range(len(prompts), dp, dp_rank)
        jobs = [(g, k) for g in range(lo, hi) for k in range(n)]
        encoded = {g: self.encode(prompts[g]) for g in range(lo, hi)}
        mine = []
        # every DP rank runs the same number of batches (PP/TP peers share them; DP ranks are independent)
        for b in range(0, len(jobs), self.batch_size):
            batch = jobs[b:b + self.batch_size]
            resp = self._sample([encoded[g] for g, _ in batch],
                                [request_seed(self.seed, step, g) * 1000 + k for g, k in batch], temperature)
            for (g, k), r in zip(batch, resp):
                finish = "stop" if r and r[-1] == self.eos else "length"
                text = self.tok.decode([t for t in r if t != self.eos], skip_special_tokens=True)
                mine.append(Rollout(encoded[g], r, [0.0] * len(r), text, finish, g, k))
        return _gather(mine)


class VLLMBackend(RolloutBackend):
    """A vLLM engine per rank (rollout/engine.py). `start_vllm` builds it before the policy exists, with dummy
    weights, and puts it to sleep; `attach` gives it the policy's chunks. The policy's weights arrive by in-place sync
    (rollout/sync.py) before the first generation and after every optimizer step; on CUDA the engine sleeps while
    Megatron trains (the order of events is in rollout/gpu.py)."""

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, seed: int, device: str):
        from mgs_megatron.rollout.engine import RolloutEngine

        self.cfg, self.chunks, self.model_cfg = cfg, None, None
        # dummy weights: vLLM reads only config.json and the tokenizer from model_dir
        engine_cfg = replace(cfg, extra_engine_kwargs={"load_format": "dummy", **cfg.extra_engine_kwargs})
        with _rng_untouched(device):  # vLLM seeds torch's global RNGs; the trainer's own draws must not move
            self.engine = RolloutEngine(model_dir, engine_cfg, seed=seed, device=device, tokenizer=model_dir)
        self.engine.mark_invalid("dummy weights at start; the first weight sync loads the policy's")
        self.needs_sync = True
        self.memory = EngineMemory(self.engine)
        self.memory.sleep(level=2)  # nothing worth keeping a host copy of

    def attach(self, chunks, model_cfg) -> "VLLMBackend":
        self.chunks, self.model_cfg = chunks, model_cfg
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
        return self._awake()

    def _awake(self) -> dict:
        self.memory.wake(WEIGHTS)
        metrics = self._sync() if self.needs_sync else {}
        self.memory.wake(KV_CACHE)
        return metrics

    def _sync(self) -> dict:
        from mgs_megatron.rollout.sync import sync_weights

        self.needs_sync = False  # a failed sync leaves the engine invalid (EngineInvalidError), it is not retried
        return sync_weights(self.engine, self.chunks, self.model_cfg).as_metrics()

    def close(self) -> None:
        self.engine.close()


@contextmanager
def _rng_untouched(device: str):
    devices = [torch.cuda.current_device()] if device != "cpu" and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def start_vllm(cfg: RolloutConfig, *, seed: int, device: str, workdir: Path, hf_config: dict,
               hf_side_dir: Optional[str]) -> Optional[VLLMBackend]:
    """The vLLM engine, started before the policy allocates anything (so that vLLM's start-up memory check and
    profiling see a free GPU) and asleep; None for the megatron backend. Every rank calls it. Its model directory
    `workdir`/rollout_engine holds only config.json and the tokenizer files (rank 0 writes it)."""
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
    return VLLMBackend(cfg, str(model_dir), seed=seed, device=device)


def build_backend(cfg: RolloutConfig, *, started: Optional[VLLMBackend], chunks, model_cfg, tokenizer, seed: int
                  ) -> RolloutBackend:
    """The configured backend: the vLLM engine from `start_vllm` given the policy's chunks, or the Megatron
    sampler."""
    if cfg.backend == "megatron":
        return MegatronBackend(cfg, chunks, tokenizer, model_cfg.vocab_size, seed=seed)
    return started.attach(chunks, model_cfg)
