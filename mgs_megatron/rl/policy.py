"""The policy: the Megatron model being trained, its frozen reference, its optimizer (and MGS), the RL loss, the one
gradient path of every strategy, and the log-prob recomputation.

Losses are summed per token and Megatron divides by the step's global token count
(TransformerConfig.calculate_per_token_loss), so MGS with rule 'sum' is exactly the Mixed-RL step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mgs_megatron.devices import collective_device, compute_device
from mgs_megatron.megatron.domain_step import domain_step
from mgs_megatron.megatron.forward import sequence_logprobs
from mgs_megatron.megatron.model import PrecisionConfig, build_gpt_model
from mgs_megatron.megatron.optim import make_trainable
from mgs_megatron.megatron.schedule import forward_backward, pad_batches, sum_reported
from mgs_megatron.models import ModelConfig
from mgs_megatron.rl.losses import STAT_NAMES, make_rl_loss, training_temperature


def precision_of(cfg) -> PrecisionConfig:
    dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
    return PrecisionConfig(params_dtype=dtype, calculate_per_token_loss=True)


def initial_checkpoint(cfg, out: Path) -> Optional[Path]:
    """The canonical checkpoint the policy starts from: model.init_checkpoint; or model.path converted once into
    <out>/init_mcore (by rank 0 while the others wait; reused when complete); or None (Megatron's seeded init, the
    same on every layout). Every rank calls it."""
    from mgs_megatron.convert import hf_to_mcore_checkpoint, is_canonical

    if cfg.model.init_checkpoint:
        return Path(cfg.model.init_checkpoint)
    if not cfg.model.path:
        return None
    cache = out / "init_mcore"
    if dist.get_rank() == 0 and not is_canonical(cache):  # its metadata is written last: a complete conversion
        hf_to_mcore_checkpoint(cfg.model.path, cache, overwrite=True, progress=False)
    dist.barrier()
    return cache


def load_initial_weights(chunks, checkpoint: Optional[Path]) -> None:
    from mgs_megatron.weights import load_weights

    if checkpoint is not None:
        load_weights(chunks, checkpoint)


class Policy:
    """Args:
        cfg: the TrainConfig (model, parallel, optim, algo, strategy, mgs sections).
        model_cfg: the model's ModelConfig.
        domains: the step's domains, in the order every rank enters them (MGS).
        start_from: canonical checkpoint of the initial weights (None: seeded init).
        device: 'cpu' or 'cuda'.
    """

    def __init__(self, cfg, model_cfg: ModelConfig, domains, start_from: Optional[Path], device: str):
        from mgs_megatron.megatron.mgs import ModularGradientSurgery

        self.model_cfg, self.device = model_cfg, device
        self.micro_batch_size = cfg.optim.micro_batch_size
        self.pp = cfg.parallel.pipeline_model_parallel_size
        precision = precision_of(cfg)
        # on a GPU, weights that a checkpoint overwrites are never drawn (nor materialised on the CPU first)
        self.skip_init = device == "cuda" and start_from is not None
        model = build_gpt_model(model_cfg, cfg.parallel, precision, device=device, initialize=not self.skip_init)
        load_initial_weights([model], start_from)
        self.ref = self._frozen_copy(model, cfg, precision) if cfg.algo.kl_coef else None
        self.chunks, self.optimizer = make_trainable([model], cfg.optim, params_dtype=precision.params_dtype,
                                                     device=device)
        self.mgs = ModularGradientSurgery(self.chunks, self.optimizer, cfg.mgs, domains, model_config=model_cfg) \
            if cfg.strategy == "mgs" else None
        self.temperature = training_temperature(cfg.algo, cfg.rollout.temperature)
        self.loss_fn = make_rl_loss(cfg.algo, model_cfg.vocab_size, self.temperature,
                                    horizon=cfg.rollout.max_response_len)

    def _frozen_copy(self, model, cfg, precision) -> list:
        ref = build_gpt_model(self.model_cfg, cfg.parallel, precision, device=self.device, initialize=False)
        ref.to(compute_device())
        with torch.no_grad():
            for p, q in zip(ref.parameters(), model.parameters()):
                p.copy_(q)
                p.requires_grad_(False)
        return [ref]

    # ------------------------------------------------------------------------------------------------ logprobs
    def token_logprobs(self, sequences, prompt_lens, *, reference: bool = False) -> list[torch.Tensor]:
        """Per-token logprobs of each sequence's response under the policy (or the reference; the policy when
        there is no reference model) at the training temperature, on every rank."""
        chunks = self.ref if reference and self.ref is not None else self.chunks
        return sequence_logprobs(chunks, sequences, prompt_lens, self.model_cfg.vocab_size,
                                 temperature=self.temperature, micro_batch_size=self.micro_batch_size)

    # ------------------------------------------------------------------------------------------------ update
    def update(self, groups: dict, pad: int) -> dict:
        """One optimizer step over this rank's micro-batches {domain: [batch dict]} (domain_step: per domain under
        MGS, one schedule call otherwise); returns the actor and surgery metrics (reduced over ranks). Micro-batches
        keep their own length, except under pipeline parallelism, where one schedule call needs one shape."""
        for c in self.chunks:
            c.train(True)

        def run_schedule(batches):
            if self.pp > 1:
                batches = pad_batches(batches, max(b["tokens"].shape[1] for b in batches), pad)
            return forward_backward(self.chunks, batches, num_microbatches=len(batches),
                                    seq_length=max(b["tokens"].shape[1] for b in batches),
                                    micro_batch_size=self.micro_batch_size, loss_fn=self.loss_fn)

        res = domain_step(self.chunks, self.optimizer, groups, run_schedule, mgs=self.mgs)
        stats = torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64, device=collective_device())
        if res.outputs:
            stats += torch.stack([o["rl"] for o in res.outputs]).sum(0).to(stats.device)
        sum_reported(stats)
        ntok = max(float(stats[-1]), 1.0)
        metrics = {name: float(stats[i]) / ntok for i, name in enumerate(STAT_NAMES)}
        metrics.update({"actor/tokens": float(stats[-1]), "actor/update_ok": res.update_ok,
                        "actor/grad_norm": float(res.grad_norm) if res.grad_norm is not None else 0.0})
        metrics.update({k: float(v) for k, v in res.surgery_stats.items()})
        return metrics

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Rank-local extras of a checkpoint beyond the model and optimizer: MGS rule state, reference weights."""
        state = {"mgs": self.mgs.state_dict() if self.mgs is not None else None}
        if self.ref is not None:
            state["ref"] = [m.state_dict() for m in self.ref]
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.mgs is not None and state.get("mgs"):
            self.mgs.load_state_dict(state["mgs"])
        if self.ref is not None and state.get("ref"):
            for m, sd in zip(self.ref, state["ref"]):
                m.load_state_dict(sd)


__all__ = ["Policy", "initial_checkpoint", "load_initial_weights", "precision_of"]
