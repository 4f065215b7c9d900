"""The RL trainer (GRPO; Mixed, Sequential or MGS), read top to bottom:

    setup:  process groups -> supervised warm-up (cached) -> model (+ frozen reference) -> DDP + Megatron
            optimizer (+ MGS) -> sampler, rewards, rollout backend -> resume from the latest checkpoint
    step:   sample prompts -> rollout -> reward -> GRPO advantages -> old/ref logprobs -> domain-pure micro-batches
            -> forward/backward (per domain under MGS; all at once for mixed/sequential) -> optimizer step
            -> weight sync -> metrics (JSONL + TensorBoard) -> validation / checkpoint / SIGTERM
    end:    checkpoint, HF export, summary table.

Every rank runs this same code (SPMD); rank 0 writes metrics. Losses are summed per token and Megatron divides by
the step's global token count (calculate_per_token_loss), so MGS with rule 'sum' equals Mixed RL exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from mgs_megatron.rl import algos
from mgs_megatron.rl import checkpoint as ckpt
from mgs_megatron.rl.config import TrainConfig, check_paths
from mgs_megatron.rl.losses import STAT_NAMES, make_rl_loss
from mgs_megatron.rl.metrics import MetricsWriter, accuracy, reduce_max, system_stats
from mgs_megatron.rl.warmup import maybe_warmup

log = logging.getLogger("mgs_megatron.rl")


class _Stop:
    requested = False


def _on_sigterm(signum, frame):  # finish the current step, checkpoint, exit
    _Stop.requested = True


def _read_hf_config(cfg: TrainConfig) -> dict:
    if cfg.model.hf_config:
        return dict(cfg.model.hf_config)
    return json.loads((Path(cfg.model.path) / "config.json").read_text())


class Trainer:
    # ================================================================================================ setup
    def __init__(self, cfg: TrainConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig
        from transformers import AutoTokenizer

        from mgs_megatron.convert import model_config_from_hf
        from mgs_megatron.data import DataConfig, MultiDomainSampler
        from mgs_megatron.megatron import parallel
        from mgs_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_gpt_model
        from mgs_megatron.megatron.optim import build_optimizer, wrap_ddp
        from mgs_megatron.megatron.schedule import configure_grad_sync
        from mgs_megatron.rewards import RewardManager

        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        data = check_paths(cfg)  # cheap, before the heavy set-up
        torch.set_num_threads(max(1, cfg.launcher.threads_per_proc))
        self.layout = ParallelConfig(cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size)
        self.hf_config = _read_hf_config(cfg)
        self.model_cfg = model_config_from_hf(self.hf_config)
        self.device = parallel.initialize(self.layout, seed=cfg.run.seed, device=cfg.launcher.device)
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
        precision = PrecisionConfig(params_dtype=dtype, calculate_per_token_loss=True)

        # supervised warm-up on noisy toy demonstrations (cached; None when off or resuming): the base policy
        init = maybe_warmup(cfg, data, model_cfg=self.model_cfg, hf_config=self.hf_config, layout=self.layout,
                            precision=precision, device=self.device, load_initial_weights=self._load_initial_weights)

        # policy (+ frozen reference; both start from the warm-up when there is one)
        model = build_gpt_model(self.model_cfg, self.layout, precision)
        self._load_initial_weights([model], init)
        self.ref = None
        if cfg.algo.kl_coef:
            self.ref = [build_gpt_model(self.model_cfg, self.layout, precision)]
            with torch.no_grad():
                for p, q in zip(self.ref[0].parameters(), model.parameters()):
                    p.copy_(q)
                    p.requires_grad_(False)
        self.chunks = wrap_ddp([model], DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optim.use_distributed_optimizer),
            device=self.device)
        o = cfg.optim
        self.optimizer = build_optimizer(self.chunks, OptimizerConfig(
            optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, use_distributed_optimizer=o.use_distributed_optimizer, bf16=dtype == torch.bfloat16,
            params_dtype=dtype))
        configure_grad_sync(self.chunks)

        # data, rewards, strategy
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
        val_n = cfg.data.val_holdout if not cfg.data.val_sources else 0
        train = {d: v[:-val_n] if val_n and len(v) > 2 * val_n else v for d, v in data.items()}
        self.val_data = self._val_prompts(data, val_n)
        proportions = dict(cfg.data.proportions) or {d: 1.0 for d in train}
        schedule = "sequential" if cfg.strategy == "sequential" else "mixed"
        self.sampler = MultiDomainSampler(DataConfig(
            proportions=proportions, prompts_per_step=cfg.data.prompts_per_step, seed=cfg.run.seed,
            schedule=schedule, stages=[tuple(s) for s in cfg.sequential.stages] or None,
            steps_per_stage=cfg.sequential.steps_per_stage), data=train)
        self.domains = list(self.sampler.domains)
        self.rewards = RewardManager({d: cfg.rewards.get(d, {"reward": d}) for d in self.domains})
        self.mgs = None
        if cfg.strategy == "mgs":
            from mgs_megatron.megatron.mgs import MGSConfig, ModularGradientSurgery

            self.mgs = ModularGradientSurgery(self.chunks, self.optimizer, MGSConfig(
                **dataclasses.asdict(cfg.mgs), domains=tuple(self.domains)), model_config=self.model_cfg)
        self.loss_fn = make_rl_loss(cfg.algo, self.model_cfg.vocab_size)

        # resume, then the rollout backend (it starts from the resumed weights)
        self.step = 0
        self.history: list[dict] = []
        if cfg.run.resume == "auto":
            self._resume()
        self.backend = self._build_backend()
        self.writer = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            self.writer = MetricsWriter(self.out, config=cfg.to_dict(), run_name=cfg.run.name,
                                        tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
                                        wandb_project=cfg.run.wandb_project)

    def _load_initial_weights(self, chunks, checkpoint=None) -> None:
        from mgs_megatron.convert import hf_to_mcore_checkpoint, load_checkpoint
        from mgs_megatron.convert.checkpoint import META

        if checkpoint is not None:
            load_checkpoint(chunks, checkpoint)
        elif self.cfg.model.init_checkpoint:
            load_checkpoint(chunks, self.cfg.model.init_checkpoint)
        elif self.cfg.model.path:
            cache = self.out / "init_mcore"
            if self.rank == 0 and not (cache / META).exists():  # written last: a complete conversion
                hf_to_mcore_checkpoint(self.cfg.model.path, cache, overwrite=True, progress=False)
            dist.barrier()
            load_checkpoint(chunks, cache)
        # else: from scratch (Megatron's seeded init; the same on every layout)

    def _val_prompts(self, data, val_n):
        from mgs_megatron.data import load_sources

        if self.cfg.data.val_sources:
            data = load_sources(list(self.cfg.data.val_sources))
            val_n = None
        k = self.cfg.run.val_prompts_per_domain
        out = {}
        for d, v in data.items():
            pool = v[-val_n:] if val_n else v
            out[d] = pool[:k] if k else []
        return out

    def _build_backend(self):
        from mgs_megatron.rl.rollout_backends import MegatronSampler, VLLMBackend

        r = self.cfg.rollout
        if r.backend == "megatron":
            return MegatronSampler(self.chunks, self.tokenizer, self.model_cfg.vocab_size,
                                   max_prompt_len=r.max_prompt_len, max_response_len=r.max_response_len,
                                   temperature=r.temperature, top_p=r.top_p, seed=self.cfg.run.seed)
        from mgs_megatron.convert import export_hf

        hf_dir = self.out / "rollout_init"
        export_hf(self.chunks, self.model_cfg, hf_dir, hf_config=self.hf_config, overwrite=True,
                  hf_side_dir=self.cfg.model.tokenizer or self.cfg.model.path)
        return VLLMBackend(str(hf_dir), str(hf_dir), self.chunks,  # the export carries the tokenizer files
                           self.model_cfg, max_prompt_len=r.max_prompt_len, max_response_len=r.max_response_len,
                           temperature=r.temperature, top_p=r.top_p, seed=self.cfg.run.seed,
                           kv_cache_bytes=r.kv_cache_bytes, dtype=r.dtype, rollout_tp=r.rollout_tp,
                           device=self.device)

    # ================================================================================================ one step
    def train_step(self) -> dict:
        from mgs_megatron.megatron.optim import zero_grads
        from mgs_megatron.megatron.schedule import forward_backward, sum_reported

        cfg, t0 = self.cfg, time.perf_counter()
        metrics: dict = {"step": self.step + 1}
        # 1. prompts (the same global list on every rank)
        prompts = self.sampler.next_step()
        # 2. rollouts (every rank gets the global list)
        rollouts = self.backend.generate([p.as_messages() for p in prompts], cfg.rollout.n, step=self.step)
        t_gen = time.perf_counter()
        # 3. rewards: each rank scores a share, then all-gather
        scores = self._score(prompts, rollouts)
        t_rew = time.perf_counter()
        # 4. GRPO advantages per prompt group
        r = torch.tensor(scores, dtype=torch.float32)
        groups = [ro.prompt_index for ro in rollouts]
        adv = algos.compute_advantage(cfg.algo.adv_estimator, r, groups, norm_std=cfg.algo.norm_adv_by_std,
                                      eps=cfg.algo.adv_eps)
        keep = list(range(len(rollouts)))
        if cfg.algo.filter_zero_variance:
            mask = algos.nonzero_variance_groups(r, groups)
            keep = [i for i in keep if mask[i]]
        domains = [prompts[ro.prompt_index].domain for ro in rollouts]
        for d in self.domains:
            idx = [i for i, x in enumerate(domains) if x == d]
            if idx:
                metrics[f"reward/{d}"] = float(r[idx].mean())
                metrics[f"response_length/{d}"] = sum(len(rollouts[i].response_ids) for i in idx) / len(idx)
                metrics[f"reward_std/{d}"] = float(r[idx].std()) if len(idx) > 1 else 0.0
                threshold = self.rewards.accuracy_threshold(d)
                if threshold is not None:
                    metrics[f"acc/{d}"] = accuracy(r[idx].tolist(), threshold)
        metrics["reward/all"] = float(r.mean())
        metrics["samples_kept"] = len(keep)
        # 5. domain-pure micro-batches for this DP rank, old/ref logprobs
        plan, seq_len, lp_diff = self._micro_batches(rollouts, adv, domains, keep)
        metrics.update(lp_diff)
        warn = cfg.rollout.logprob_diff_warn
        if warn and lp_diff.get("rollout/logprob_diff_max", 0.0) > warn and self.is_main:
            log.warning("step %d: rollout/logprob_diff_max %.3g > rollout.logprob_diff_warn %.3g: the rollout "
                        "engine's weights may not match Megatron's (a failed sync?)", self.step + 1,
                        lp_diff["rollout/logprob_diff_max"], warn)
        t_lp = time.perf_counter()
        # 6-7. forward/backward and the optimizer step
        self._set_train(True)
        stats = torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64)
        fb = dict(seq_length=seq_len, micro_batch_size=cfg.optim.micro_batch_size, loss_fn=self.loss_fn)
        if self.mgs is not None:
            for d in self.domains:  # every rank enters every domain, in the same order
                with self.mgs.domain(d):
                    mbs = [mb for dd, mb in plan if dd == d]
                    if mbs:
                        stats += self._sum_stats(forward_backward(self.chunks, mbs, num_microbatches=len(mbs), **fb))
            ok, grad_norm, _, sstats = self.mgs.step()
            metrics.update({k: float(v) for k, v in sstats.items()})
            metrics["module_cos"] = self._module_cos()
        else:
            zero_grads(self.chunks, self.optimizer)
            mbs = [mb for _, mb in plan]
            if mbs:
                stats += self._sum_stats(forward_backward(self.chunks, mbs, num_microbatches=len(mbs), **fb))
            ok, grad_norm, _ = self.optimizer.step()
        t_train = time.perf_counter()
        sum_reported(stats)
        ntok = max(float(stats[-1]), 1.0)
        for i, name in enumerate(STAT_NAMES):
            metrics[name] = float(stats[i]) / ntok
        metrics["actor/tokens"] = float(stats[-1])
        metrics["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        metrics["actor/update_ok"] = bool(ok)
        # 8. weight sync into the rollout engine
        metrics.update(self.backend.sync_weights())
        t_end = time.perf_counter()
        metrics.update({"time/generate": t_gen - t0, "time/reward": t_rew - t_gen, "time/logprobs": t_train - t_lp,
                        "time/step": t_end - t0})
        metrics.update(reduce_max(system_stats(self.device)))
        self.step += 1
        return metrics

    def _set_train(self, mode: bool) -> None:
        for c in self.chunks:
            c.train(mode)

    @staticmethod
    def _sum_stats(outs: list[dict]) -> torch.Tensor:
        if not outs:
            return torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64)
        return torch.stack([o["rl"] for o in outs]).sum(0)

    def _module_cos(self) -> dict:
        G = self.mgs.last_gram.double()
        names, doms = self.mgs.module_names, self.mgs.last_domains
        n = G.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        out = {}
        for a in range(len(doms)):
            for b in range(a + 1, len(doms)):
                den = (n[:, a] * n[:, b]).clamp_min(1e-30)
                out[f"{doms[a]}-{doms[b]}"] = dict(zip(names, (G[:, a, b] / den).tolist()))
        return out

    def _score(self, prompts, rollouts) -> list[float]:
        from mgs_megatron.rewards import RewardInput
        from mgs_megatron.rollout.distribute import split_range

        world = dist.get_world_size()
        lo, hi = split_range(len(rollouts), world, self.rank)
        items = [RewardInput(prompt=prompts[ro.prompt_index].as_messages(), response=ro.text,
                             sample=prompts[ro.prompt_index].fields, domain=prompts[ro.prompt_index].domain)
                 for ro in rollouts[lo:hi]]
        mine = self.rewards.score(items).scores if items else []
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        return [s for p in parts for s in p]

    def _micro_batches(self, rollouts, adv, domains, keep):
        """[(domain, micro-batch dict)] of this DP rank, padded to one global sequence length; the old
        (Megatron) logprobs against the rollout engine's: rollout/logprob_diff_{max,mean} over all ranks."""
        from mgs_megatron.data import pack_sequences, plan_microbatches
        from mgs_megatron.rollout.logprobs import logprob_diff, megatron_token_logprobs

        mbs = self.cfg.optim.micro_batch_size
        kept_domains = [domains[i] for i in keep]
        plan = plan_microbatches(kept_domains, mbs, self.dp, domain_order=self.domains)[self.dp_rank]
        seq_len = max(len(rollouts[i].sequence) for i in keep) - 1 if keep else 1
        mine = [keep[j] for mb in plan for j in mb.indices]
        seqs = [rollouts[i].sequence for i in mine]
        plens = [len(rollouts[i].prompt_ids) for i in mine]
        V = self.model_cfg.vocab_size
        old = megatron_token_logprobs(self.chunks, seqs, plens, V) if mine else []
        ref = megatron_token_logprobs(self.ref, seqs, plens, V) if (mine and self.ref) else old
        diff = {}
        if self.backend.reports_logprobs:
            diff = logprob_diff([rollouts[i] for i in mine], old)
            n = diff["rollout/logprob_tokens"]
            red = torch.tensor([diff["rollout/logprob_diff_mean"] * n, n], dtype=torch.float64)
            dist.all_reduce(red)  # TP/PP duplicates weigh every DP share equally: the mean is unchanged
            diff = {"rollout/logprob_diff_max": reduce_max({"m": diff["rollout/logprob_diff_max"]})["m"],
                    "rollout/logprob_diff_mean": float(red[0] / red[1].clamp_min(1.0))}
        where = {i: k for k, i in enumerate(mine)}
        pad = self.tokenizer.pad_token_id or 0
        out = []
        for mb in plan:
            picked = [keep[j] for j in mb.indices]
            b = pack_sequences([(rollouts[i].sequence, len(rollouts[i].prompt_ids)) for i in picked], mbs, seq_len, pad)
            b.update({k: torch.zeros(mbs, seq_len) for k in ("advantages", "old_logp", "ref_logp")})
            for row, i in enumerate(picked):
                ro, k = rollouts[i], where[i]
                L, P = len(ro.sequence), len(ro.prompt_ids)
                b["advantages"][row, P - 1:L - 1] = float(adv[i])
                if L > P:
                    b["old_logp"][row, P - 1:L - 1] = old[k].float()
                    b["ref_logp"][row, P - 1:L - 1] = ref[k].float()
            out.append((mb.domain, b))
        return out, seq_len, diff

    # ================================================================================================ validation
    def validate(self) -> dict:
        """Greedy responses to held-out prompts, per domain: val/<domain>/reward."""
        prompts = [p for d in self.domains for p in self.val_data.get(d, [])]
        if not prompts:
            return {}
        rollouts = self.backend.generate([p.as_messages() for p in prompts], 1, step=10 ** 6 + self.step,
                                         temperature=0.0)
        scores = self._score(prompts, rollouts)
        out = {}
        for d in self.domains:
            s = [sc for sc, ro in zip(scores, rollouts) if prompts[ro.prompt_index].domain == d]
            if s:
                out[f"val/{d}/reward"] = sum(s) / len(s)
        return out

    # ================================================================================================ checkpoints
    def _trainer_state(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "strategy": self.cfg.strategy,
                "world_size": dist.get_world_size(), "config": self.cfg.to_dict()}

    def save(self) -> Path:
        extra = {"mgs": self.mgs.state_dict() if self.mgs is not None else None}
        if self.ref is not None:
            extra["ref"] = [m.state_dict() for m in self.ref]
        return ckpt.save(self.out / "checkpoints", self.step, self.chunks, self.optimizer, self._trainer_state(),
                         extra, keep=self.cfg.run.keep_checkpoints)

    def _resume(self) -> None:
        path = ckpt.latest(self.out / "checkpoints")
        if path is None:
            return
        state, extra = ckpt.load(path, self.chunks, self.optimizer)
        if state["world_size"] != dist.get_world_size():
            raise RuntimeError(f"checkpoint {path} was written with world size {state['world_size']}, "
                               f"this job has {dist.get_world_size()}")
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        if self.mgs is not None and extra.get("mgs"):
            self.mgs.load_state_dict(extra["mgs"])
        if self.ref is not None and extra.get("ref"):
            for m, sd in zip(self.ref, extra["ref"]):
                m.load_state_dict(sd)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    # ================================================================================================ metrics
    def _log(self, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.log(metrics)

    # ================================================================================================ the loop
    def fit(self) -> list[dict]:
        cfg = self.cfg
        signal.signal(signal.SIGTERM, _on_sigterm)
        if self.writer is not None:
            self.writer.truncate_after(self.step)
        bar = None
        if self.is_main and cfg.run.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.run.total_steps, initial=self.step, desc=cfg.run.name, dynamic_ncols=True)
        if self.step == 0 and self.val_data and any(self.val_data.values()):
            self._log({"step": 0, **self.validate()})
        while self.step < cfg.run.total_steps:
            m = self.train_step()
            if cfg.run.val_every and self.step % cfg.run.val_every == 0:
                m.update(self.validate())
            self._log(m)
            self.history.append(m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({d: f"{m.get(f'reward/{d}', 0):.2f}" for d in self.domains})
            stop = torch.tensor([1.0 if _Stop.requested else 0.0])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            periodic = cfg.run.save_every and self.step % cfg.run.save_every == 0
            if periodic or stop.item() > 0:
                self.save()
            if stop.item() > 0:
                if self.is_main:
                    log.warning("SIGTERM: checkpoint written at step %d, exiting", self.step)
                raise SystemExit(143)
            if cfg.run.fail_at_step == self.step:
                raise SystemExit(17)  # testing aid: a crash right after this step's (periodic) save
        if bar is not None:
            bar.close()
        if not cfg.run.save_every or self.step % cfg.run.save_every:
            self.save()
        if cfg.run.export_hf:
            from mgs_megatron.convert import export_hf

            export_hf(self.chunks, self.model_cfg, self.out / "hf", hf_config=self.hf_config, overwrite=True,
                      hf_side_dir=cfg.model.tokenizer or cfg.model.path)
        return self.history

    def close(self) -> None:
        from mgs_megatron.megatron import parallel

        self.backend.close()
        self.rewards.close()
        if self.writer is not None:
            self.writer.close()
        parallel.destroy()


def summary_table(metrics_file: Path, domains=None) -> str:
    """Per-domain reward at the start vs the end of a run, each measured the same way: the training reward as the
    mean over the first / last k steps (k = a fifth of the run, 1..10), and, when the run validated, the greedy
    validation reward at the first vs the last validation (step 0 = before any RL update)."""
    rows = [json.loads(ln) for ln in Path(metrics_file).read_text().splitlines() if ln.strip()]
    val = [r for r in rows if any(k.startswith("val/") for k in r)]
    rows = [r for r in rows if r.get("step", 0) > 0 and any(k.startswith("reward/") for k in r)]
    if not rows:
        return "(no metrics)"
    domains = domains or sorted({k.split("/")[1] for r in rows for k in r if k.startswith("reward/")} - {"all"})
    k = min(10, max(1, len(rows) // 5))
    lines = [f"{'domain':<8} {'start':>8} {'end':>8} {'delta':>8}   (train reward: mean of the first vs last {k} "
             f"steps)"]
    for d in domains:
        vals = [r[f"reward/{d}"] for r in rows if f"reward/{d}" in r]
        if not vals:
            continue
        a, b = sum(vals[:k]) / len(vals[:k]), sum(vals[-k:]) / len(vals[-k:])
        lines.append(f"{d:<8} {a:>8.3f} {b:>8.3f} {b - a:>+8.3f}")
    if len(val) >= 2:
        lines.append(f"{'':<8} {'':>8} {'':>8} {'':>8}   (validation, greedy: step {val[0]['step']} vs step "
                     f"{val[-1]['step']})")
        for d in domains:
            key = f"val/{d}/reward"
            if key in val[0] and key in val[-1]:
                a, b = val[0][key], val[-1][key]
                lines.append(f"{'val/' + d:<8} {a:>8.3f} {b:>8.3f} {b - a:>+8.3f}")
    return "\n".join(lines)


def run(cfg: TrainConfig) -> list[dict]:
    logging.basicConfig(level=os.environ.get("MGS_LOG_LEVEL", "WARNING"))
    trainer = Trainer(cfg)
    try:
        hist = trainer.fit()
        if trainer.is_main:
            print(summary_table(trainer.out / "metrics.jsonl", trainer.domains), flush=True)
        return hist
    finally:
        trainer.close()
