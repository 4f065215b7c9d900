"""The RL loss on Megatron's output, per micro-batch, summed over tokens (Megatron divides by the step's global
token count because TransformerConfig.calculate_per_token_loss is on).

Log-probabilities and entropy come from the vocab-parallel logits (megatron/vocab_parallel.py: never the full
vocabulary on one rank, bounded fp32 temporaries, a backward that stores nothing vocabulary-sized in fp32).
"""

from __future__ import annotations

import torch

from mgs_megatron.megatron.vocab_parallel import token_logprobs
from mgs_megatron.rl import algos

STAT_NAMES = ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/clipfrac", "actor/ppo_kl")


def training_temperature(algo, rollout_temperature: float) -> float:
    """The T of softmax(logits / T) that log-probs, ratios, KL and entropy refer to."""
    t = rollout_temperature if algo.logprob_temperature == "rollout" else float(algo.logprob_temperature)
    if not t > 0:
        raise ValueError(f"log-probs at temperature {t}: set algo.logprob_temperature to a number when "
                         f"rollout.temperature is 0 (greedy)")
    return t


def make_rl_loss(algo, vocab_size: int, temperature: float = 1.0, horizon: int = 1):
    """loss_fn(logits, batch) for megatron.schedule.forward_backward. Batch tensors: tokens, targets, loss_mask,
    advantages, old_logp, ref_logp (all [b, s]). Log-probs and entropy are of softmax(logits / temperature); the
    loss is aggregated by algo.loss_agg_mode (returned as numerator and count: Megatron divides by the step's global
    count); `horizon` is seq-mean-token-sum-norm's constant (the maximum response length)."""
    need_ent = algo.entropy_coef != 0

    def loss_fn(output: torch.Tensor, batch: dict):
        mask = batch["loss_mask"].float()
        logp, ent = token_logprobs(output, batch["targets"], vocab_size=vocab_size, temperature=temperature,
                                   need_entropy=need_ent)
        pg, pg_m = algos.policy_loss(algo.policy_loss, logp, batch["old_logp"], batch["advantages"], mask,
                                     clip_low=algo.clip_low, clip_high=algo.clip_high)
        per_token = pg
        kl = torch.zeros_like(logp)
        if algo.kl_coef:
            kl = algos.kl_penalty(algo.kl_type, logp, batch["ref_logp"])
            per_token = per_token + algo.kl_coef * kl
        if need_ent:
            per_token = per_token - algo.entropy_coef * ent
        num, count = algos.loss_terms(per_token, mask, algo.loss_agg_mode, horizon)
        stats = torch.stack([algos.masked_sum(pg, mask).detach(), algos.masked_sum(kl, mask).detach(),
                             algos.masked_sum(ent, mask).detach(), pg_m["clipfrac_sum"], pg_m["ppo_kl_sum"],
                             mask.sum().detach()]).double()
        return num, count.to(torch.int), {"rl": stats}

    return loss_fn
