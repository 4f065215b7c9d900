"""The RL loss on Megatron's output, per micro-batch (summed over tokens; Megatron divides by the step's global
token count because TransformerConfig.calculate_per_token_loss is on).

`logp_and_entropy` works on vocab-parallel logits (TP-sharded vocabulary): max / sum-exp / sum-exp*z are reduced
over the TP group with Megatron's autograd-aware all-reduce, and the TP padding columns are masked out, so logprobs
and entropy are over the real vocabulary at every TP size.
"""

from __future__ import annotations

import torch

from mgs_megatron.rl import algos


def logp_and_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, need_entropy: bool = True):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    z = logits.float()
    tp = ps.get_tensor_model_parallel_world_size()
    local_v = z.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local_v
    if start + local_v > vocab_size:  # padding columns of the TP-padded vocabulary
        cols = torch.arange(start, start + local_v, device=z.device) >= vocab_size
        z = z.masked_fill(cols, -1e9)
    if tp == 1:
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1) if need_entropy else torch.zeros_like(logp)
        return logp, ent
    group = ps.get_tensor_model_parallel_group()
    m = z.detach().max(-1, keepdim=True).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    e = (z - m).exp()
    s = reduce_from_tensor_model_parallel_region(e.sum(-1))
    log_z = m.squeeze(-1) + s.log()
    local_t = targets - start
    inside = (local_t >= 0) & (local_t < local_v)
    zt = z.gather(-1, local_t.clamp(0, local_v - 1).unsqueeze(-1)).squeeze(-1) * inside
    logp = reduce_from_tensor_model_parallel_region(zt) - log_z
    if not need_entropy:
        return logp, torch.zeros_like(logp)
    ez = reduce_from_tensor_model_parallel_region((e * z.clamp_min(-1e4)).sum(-1))
    ent = log_z - ez / s
    return logp, ent


def make_rl_loss(algo, vocab_size: int):
    """loss_fn(logits, batch) for mgs_megatron.megatron.schedule.forward_backward. Batch tensors: tokens, targets,
    loss_mask, advantages, old_logp, ref_logp (all [b, s])."""
    need_ent = algo.entropy_coef != 0

    def loss_fn(output: torch.Tensor, batch: dict):
        mask = batch["loss_mask"].float()
        logp, ent = logp_and_entropy(output, batch["targets"], vocab_size, need_ent)
        pg_sum, pg_m = algos.policy_loss(algo.policy_loss, logp, batch["old_logp"], batch["advantages"], mask,
                                         clip_low=algo.clip_low, clip_high=algo.clip_high)
        total = pg_sum
        kl_sum = torch.zeros((), dtype=total.dtype)
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


STAT_NAMES = ("actor/pg_loss", "actor/kl", "actor/entropy", "actor/clipfrac", "actor/ppo_kl")
