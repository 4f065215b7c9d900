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


def make_rl_loss(algo, vocab_size: int, temperature: float = 1.0):
    """loss_fn(logits, batch) for megatron.schedule.forward_backward. Batch tensors: tokens, targets, loss_mask,
    advantages, old_logp, ref_logp (all [b, s]). Log-probs and entropy are of softmax(logits / temperature)."""
    need_ent = algo.entropy_coef != 0

    def loss_fn(output: torch.Tensor, batch: dict):
        mask = batch["loss_mask"].float()
        logp, ent = token_logprobs(output, batch["targets"], vocab_size=vocab_size, temperature=temperature,
                                   need_entropy=need_ent)
        pg_sum, pg_m = algos.policy_loss(algo.policy_loss, logp, batch["old_logp"], batch["advantages"], mask,
                                         clip_low=algo.clip_low, clip_high=algo.clip_high)
        total = pg_sum
        kl_sum = torch.zeros((), dtype=total.dtype, device=total.device)
        if algo.kl_coef:
            kl_sum = algos.masked_sum(algos.kl_penalty(algo.kl_type, logp, batch["ref_logp"]), mask)
            total = total + algo.kl_coef * kl_sum
        ent_sum = algos.masked_sum(ent, mask)
        if need_ent:
            total = total - algo.entropy_coef * ent_sum
        ntok = mask.sum()
        stats = torch.stack([pg_sum.detach(), kl_sum.detach(), ent_sum.detach(), pg_m["clipfrac_sum"],
                             pg_m["ppo_kl_sum"], ntok.detach()]).double()
        return total, ntok.to(torch.int), {"rl": stats}

    return loss_fn
