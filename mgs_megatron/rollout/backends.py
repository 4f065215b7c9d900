"""Pluggable rollout backends: `generate(prompts, n, step, temperature) -> list[Rollout]` and `sync_weights()`.

  vllm      mgs_megatron.rollout.RolloutEngine (one engine per rank, SPMD) + in-place weight sync after each step.
  megatron  fallback without vLLM: token-by-token generation with the live Megatron model (full re-forward per
            token, no KV cache) -- fine for tiny models on CPU, and handy for tests.

Both return every rank the SAME global list of rollouts, ordered by (prompt, sample): generation is split over
ranks and the results are all-gathered (Python objects; fine at RL batch sizes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.rollout.config import PromptTooLongError, Rollout, RolloutConfig
from mgs_megatron.rollout.distribute import split_range


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

    def encode(self, prompt) -> tuple[list[int], bool]:
        """Token ids and whether they were truncated (rollout.overlong, as in RolloutEngine.prepare)."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        text = self.tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        cut = len(ids) > self.cfg.max_prompt_len
        if cut and self.cfg.overlong == "error":
            raise PromptTooLongError(f"a prompt has {len(ids)} tokens > rollout.max_prompt_len="
                                     f"{self.cfg.max_prompt_len} (rollout.overlong=truncate keeps its last tokens): "
                                     f"{text[:80]!r}...")
        return ids[-self.cfg.max_prompt_len:], cut

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
        encoded, cut = {}, {}
        for g in range(lo, hi):
            encoded[g], cut[g] = self.encode(prompts[g])
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
    """A vLLM engine per rank (rollout/engine.py), started from an HF export of the current weights and kept in sync
    in place after every optimizer step (rollout/sync.py)."""

    def __init__(self, cfg: RolloutConfig, hf_dir: str, chunks, model_cfg, *, seed: int, device: str,
                 weights_version: int = 0):
        from mgs_megatron.rollout.engine import RolloutEngine

        self.cfg, self.chunks, self.model_cfg = cfg, chunks, model_cfg
        self.engine = RolloutEngine(hf_dir, cfg, seed=seed, device=device, tokenizer=hf_dir)
        self.engine.version = weights_version  # a resumed run's weights are those of its step

    def generate(self, prompts, n, *, step, temperature=None):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        tp = self.cfg.rollout_tp
        lo, hi = split_range(len(prompts), world // tp, rank // tp)
        msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts[lo:hi]]
        over = {"n": n}
        if temperature is not None:
            over["temperature"] = temperature
        mine = self.engine.generate(msgs, step=step, prompt_offset=lo, **over)
        return _gather(mine, keep_first_of=tp)

    def sync_weights(self) -> dict:
        from mgs_megatron.rollout.sync import sync_weights

        return sync_weights(self.engine, self.chunks, self.model_cfg).as_metrics()

    def close(self) -> None:
        self.engine.close()


def build_backend(cfg: RolloutConfig, *, chunks, model_cfg, tokenizer, seed: int, device: str, workdir: Path,
                  hf_config: dict, hf_side_dir: Optional[str], weights_version: int = 0) -> RolloutBackend:
    """The configured backend; vLLM starts from an HF export of the live weights in `workdir`/rollout_init (which
    also carries the tokenizer files). `weights_version`: the version of those weights (the resumed step), so that
    rollout/weights_version continues across a resume."""
    if cfg.backend == "megatron":
        return MegatronBackend(cfg, chunks, tokenizer, model_cfg.vocab_size, seed=seed)
    from mgs_megatron.weights import export_hf

    hf_dir = Path(workdir) / "rollout_init"
    export_hf(chunks, model_cfg, hf_dir, hf_config=hf_config, overwrite=True, hf_side_dir=hf_side_dir)
    return VLLMBackend(cfg, str(hf_dir), chunks, model_cfg, seed=seed, device=device, weights_version=weights_version)
