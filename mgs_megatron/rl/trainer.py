"""The RL trainer (GRPO; Mixed, Sequential or MGS), read top to bottom.

    set-up  process groups -> data -> supervised warm-up (cached) -> vLLM engine (before the policy allocates GPU
            memory; asleep) -> policy (model, reference, optimizer, MGS) -> prompt sampler, rewards -> resume
            -> rollout backend -> validation, checkpoints, metrics
    step    generate -> score -> advantages -> micro-batches -> old/ref logprobs -> update -> weight sync
    loop    step, validate when due, log, checkpoint when due; at the end: checkpoint, HF export, summary table.
    stop    a stop request (SIGTERM: preemption) is checked at phase boundaries (after the rollout, after the train
            step): every rank checkpoints and the run exits 143; the same command resumes exactly where it stopped.

Every rank runs this same code (SPMD); rank 0 writes metrics.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers import AutoTokenizer

from mgs_megatron.data import PromptSampler, train_val_split
from mgs_megatron.data.templates import resolve_chat_template
from mgs_megatron.megatron import parallel
from mgs_megatron.models import model_config_from_hf
from mgs_megatron.rewards import RewardManager
from mgs_megatron.rl import resume
from mgs_megatron.rl.batches import pack_plan, rank_plan, score_samples
from mgs_megatron.rl.config import TrainConfig, check_paths, read_hf_config
from mgs_megatron.rl.losses import training_temperature
from mgs_megatron.rl.metrics import (
    MetricsWriter,
    PhaseTimer,
    domain_metrics,
    module_cosines,
    progress_postfix,
    reduce_max,
    rollout_metrics,
    summary_table,
    system_stats,
)
from mgs_megatron.rl.policy import Policy, initial_checkpoint, load_initial_weights, precision_of
from mgs_megatron.rl.resume import Checkpointer, Preemption
from mgs_megatron.rl.scoring import score_rollouts
from mgs_megatron.rl.validation import Validator
from mgs_megatron.rl.warmup import maybe_warmup
from mgs_megatron.rollout.backends import build_backend, start_vllm
from mgs_megatron.rollout.logprobs import logprob_diff_over_ranks
from mgs_megatron.weights import export_hf
from mgs_megatron.weights.torch_dist import load_torch_dist, save_torch_dist

log = logging.getLogger("mgs_megatron.rl")


class Preempted(SystemExit):
    """Raised after the checkpoint that a preemption request (SIGTERM) triggered: the process exits 143."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


class Trainer:
    # ================================================================================================ set-up
    def __init__(self, cfg: TrainConfig):
        self.cfg, self.out = cfg, Path(cfg.run.output_dir)
        self.preemption = Preemption()
        self.preemption.install()  # from here on SIGTERM means "checkpoint at the next phase boundary"
        data = check_paths(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # cheap, before the heavy set-up
        train, val = train_val_split(data, cfg.data, cfg.run.val_prompts_per_domain)
        torch.set_num_threads(max(1, cfg.launcher.threads_per_proc))
        self.hf_config = read_hf_config(cfg)
        self.model_cfg = model_config_from_hf(self.hf_config)
        self.device = parallel.initialize(cfg.parallel, seed=cfg.run.seed, device=cfg.launcher.device,
                                          timeout_s=cfg.launcher.collective_timeout_s)
        self.is_main = dist.get_rank() == 0
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

        start = initial_checkpoint(cfg, self.out)
        start = maybe_warmup(cfg, train, model_cfg=self.model_cfg, hf_config=self.hf_config, layout=cfg.parallel,
                             precision=precision_of(cfg), device=self.device,
                             load_initial_weights=lambda chunks: load_initial_weights(chunks, start)) or start
        chat_template = resolve_chat_template(cfg.data.chat_template)
        started = start_vllm(  # before the policy allocates anything: vLLM's start-up check sees a free GPU
            cfg.rollout, seed=cfg.run.seed, device=self.device, workdir=self.out, hf_config=self.hf_config,
            hf_side_dir=cfg.model.tokenizer or cfg.model.path, chat_template=chat_template,
            logprob_temperature=training_temperature(cfg.algo, cfg.rollout.temperature))
        self.prompts = PromptSampler(cfg.data, train, seed=cfg.run.seed,
                                     schedule="sequential" if cfg.strategy == "sequential" else "mixed")
        self.domains = list(self.prompts.domains)
        self.policy = Policy(cfg, self.model_cfg, self.domains, start, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
        self.rewards = RewardManager(cfg.rewards, domains=self.domains)
        self.validator = Validator(val, self.domains, val_every=cfg.run.val_every, total_steps=cfg.run.total_steps)
        self.checkpoints = Checkpointer(self.out / "checkpoints", every=cfg.run.save_every,
                                        keep=cfg.run.keep_checkpoints)
        self.step = 0
        if cfg.run.resume == "auto":
            self._resume()
        elif cfg.run.resume == "overwrite":
            self.checkpoints.clear()
        self.backend = build_backend(cfg.rollout, started=started, chunks=self.policy.chunks,
                                     model_cfg=self.model_cfg, tokenizer=self.tokenizer, seed=cfg.run.seed,
                                     chat_template=chat_template, weights_version=self.step)
        self.writer = MetricsWriter.for_run(cfg, self.out) if self.is_main else None

    # ================================================================================================ one step
    def train_step(self) -> dict:
        cfg, m = self.cfg, {"step": self.step + 1}
        timer, before = PhaseTimer(m), self._draw_state()
        with timer("generate"):
            prompts = self.prompts.next_step()
            rollouts = self.backend.generate([p.as_messages() for p in prompts], cfg.rollout.n, step=self.step)
            m.update(rollout_metrics(rollouts, len(prompts)))
        if self.preemption.requested():  # phase boundary: stop as if this step had not begun
            self._stop(rewind_to=before)
        with timer("score"):
            scored = score_rollouts(self.rewards, prompts, rollouts)
            m.update(self.rewards.check_step(scored.domains, scored.outcomes))  # stops a run of failing rewards
        with timer("advantages"):
            samples = score_samples(prompts, rollouts, scored.scores, cfg.algo)
            m.update(domain_metrics(samples, self.domains, self.rewards.accuracy_threshold))
        with timer("batches"):
            plan = rank_plan(samples, cfg.optim.micro_batch_size, self.dp, self.dp_rank, self.domains)
            mine = [samples.rollouts[i] for mb in plan for i in mb.indices]
        with timer("logprobs"):
            seqs, plens = [ro.sequence for ro in mine], [len(ro.prompt_ids) for ro in mine]
            old = self.policy.token_logprobs(seqs, plens)
            ref = self.policy.token_logprobs(seqs, plens, reference=True) if self.policy.ref else old
            m.update(self._logprob_diff(mine, old))
        with timer("update"):
            pad = self.tokenizer.pad_token_id or 0
            groups = pack_plan(samples, plan, old, ref, micro_batch_size=cfg.optim.micro_batch_size, pad=pad)
            m.update(self.policy.update(groups, pad))
            if self.policy.mgs is not None:
                mgs = self.policy.mgs
                m["module_cos"] = module_cosines(mgs.last_gram, mgs.last_weights, mgs.module_names, mgs.last_domains)
        with timer("sync"):
            m.update(self.backend.sync_weights())
        m.update(reduce_max(system_stats(self.device)))
        self.step += 1
        return m

    def _logprob_diff(self, rollouts, megatron_logprobs) -> dict:
        """rollout/logprob_diff_{max,mean} over all ranks: the rollout engine's logprobs vs Megatron's."""
        if not self.backend.reports_logprobs:
            return {}
        diff = logprob_diff_over_ranks(rollouts, megatron_logprobs)
        warn = self.cfg.rollout.logprob_diff_warn
        if warn and diff["rollout/logprob_diff_max"] > warn and self.is_main:
            log.warning("step %d: rollout/logprob_diff_max %.3g > rollout.logprob_diff_warn %.3g: the rollout "
                        "engine's weights may not match Megatron's (a failed sync?)", self.step + 1,
                        diff["rollout/logprob_diff_max"], warn)
        return diff

    # ================================================================================================ checkpoints
    def save(self) -> Path:
        state = {"step": self.step, "sampler": self.prompts.state_dict(), "strategy": self.cfg.strategy,
                 "world_size": dist.get_world_size(), "config": self.cfg.to_dict()}
        save_model = None
        if self.cfg.run.checkpoint_format == "torch_dist":  # Megatron-LM's format: loads at any layout, in any host
            def save_model(d):
                save_torch_dist(self.policy.chunks, self.model_cfg, d, self.step, hf_config=self.hf_config,
                                hf_side_dir=self.cfg.model.tokenizer or self.cfg.model.path)
        return self.checkpoints.save(self.step, self.policy.chunks, self.policy.optimizer, state,
                                     self.policy.state_dict(), save_model=save_model)

    def _resume(self) -> None:
        found = self.checkpoints.load_newest(  # skips damaged ones, says so
            self.policy.chunks, self.policy.optimizer, load_model=lambda d: load_torch_dist(self.policy.chunks, d))
        if found is None:
            return
        path, state, extra = found
        self.step = int(state["step"])
        if extra.get("moved_from") and self.is_main:
            log.warning("resumed the model of %s (layout %s) at layout %s; the optimizer state and RNG streams "
                        "restart", path, extra["moved_from"], resume.layout())
        self.prompts.load_state_dict(state["sampler"])
        self.policy.load_state_dict(extra)
        if self.is_main:
            print(f"mgs-train: resumed from step {self.step} ({path})", flush=True)

    def _draw_state(self) -> dict:
        """The prompt sampler's and the RNGs' state before a step draws from them (a stop inside the step rewinds
        to it)."""
        return {"sampler": self.prompts.state_dict(), "rng": resume.rng_state()}

    def _stop(self, rewind_to: Optional[dict] = None) -> None:
        """A stop request at a phase boundary: every rank checkpoints the last completed step (inside a step, after
        rewinding that step's draws, so the resumed run continues exactly as if never stopped) and exits 143."""
        if rewind_to is not None:
            self.prompts.load_state_dict(rewind_to["sampler"])
            resume.load_rng_state(rewind_to["rng"])
        if self.step > 0 and self.checkpoints.last_saved != self.step:
            self.save()
        if self.is_main:
            where = self.checkpoints.root / f"step_{self.step}" if self.step else "none yet"
            print(f"mgs-train: preempted (SIGTERM) after step {self.step}: checkpoint written to {where} (of "
                  f"{self.cfg.run.total_steps} steps); run the same command again to resume", file=sys.stderr,
                  flush=True)
        raise Preempted(self.step)

    # ================================================================================================ the loop
    def fit(self) -> list[dict]:
        cfg, history = self.cfg, []
        if self.writer is not None:
            self.writer.truncate_after(self.step)
        if self.preemption.requested():  # SIGTERM during the set-up
            self._stop()
        bar = self._progress_bar()
        if self.step == 0 and self.validator.due(0):
            self._log({"step": 0, **self.validator.run(self.backend, self.rewards, 0)})
        while self.step < cfg.run.total_steps:
            m = self.train_step()
            stopping = self.preemption.requested()  # phase boundary: after the train step
            if self.validator.due(self.step) and not stopping:  # (validation could outlast the grace period)
                m.update(self.validator.run(self.backend, self.rewards, self.step))
            self._log(m)
            history.append(m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(progress_postfix(m, self.domains))
            if self.checkpoints.due(self.step):
                self.save()
            if stopping:
                self._stop()
            if cfg.run.fail_at_step == self.step:
                raise SystemExit(17)  # testing aid: a crash right after this step's (periodic) save
        if bar is not None:
            bar.close()
        if self.checkpoints.last_saved != self.step:
            self.save()
        if cfg.run.export_hf:
            export_hf(self.policy.chunks, self.model_cfg, self.out / "hf", hf_config=self.hf_config, overwrite=True,
                      hf_side_dir=cfg.model.tokenizer or cfg.model.path)
        return history

    def _progress_bar(self):
        if not (self.is_main and self.cfg.run.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.run.total_steps, initial=self.step, desc=self.cfg.run.name, dynamic_ncols=True)

    def _log(self, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.log(metrics)

    def close(self) -> None:
        self.backend.close()
        self.rewards.close()
        if self.writer is not None:
            self.writer.close()
        parallel.destroy()


def run(cfg: TrainConfig) -> list[dict]:
    logging.basicConfig(level=cfg.run.log_level.upper())  # mgs-train configures its own output first
    trainer = Trainer(cfg)
    try:
        hist = trainer.fit()
        if trainer.is_main:
            print(summary_table(trainer.out / "metrics.jsonl", trainer.domains), flush=True)
        return hist
    finally:
        trainer.close()
