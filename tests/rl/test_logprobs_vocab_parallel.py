"""Token log-probs and entropy from vocab-parallel logits (megatron/vocab_parallel.py) against independent references:

- at TP1, TP2 and PP2, on a model whose vocabulary (101) TP2 pads to 102, for sequences of different lengths
  (padding positions masked), equal to Hugging Face's log_softmax(logits / T) of the full logits (fp32: 1e-5);
- the RL loss and its gradients equal the previous implementation's (full-vocabulary log_softmax per TP shard with
  Megatron's autograd all-reduce, copied below as of 11cf1b9) on a fixed batch, at TP1 and TP2.
"""

from __future__ import annotations

import math

import pytest
import torch

from mgs_megatron.testing.harness import Layout, run_distributed
from tests.convert import models

NAME = "llama_untied"  # vocab 101, 4 layers, 4 heads: TP2 pads the vocabulary, PP2 splits the layers
TEMPERATURE = 0.7
SEQS = [([5, 9, 2, 7, 7, 1, 3, 8], 3), ([4, 4, 11, 60, 2], 2), ([9, 100, 0, 5, 6, 7, 1, 2, 3, 4, 50], 6)]


def _rank_logprobs(mcore_dir: str, temperature: float):
    from megatron.core import parallel_state as ps

    from mgs_megatron.convert import read_model_config
    from mgs_megatron.megatron.forward import _forward_only, sequence_logprobs
    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.megatron.schedule import pack_sequences
    from mgs_megatron.megatron.vocab_parallel import token_logprobs
    from mgs_megatron.weights import load_weights

    cfg = read_model_config(mcore_dir)
    par = ParallelConfig(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    chunks = [build_gpt_model(cfg, par)]
    load_weights(chunks, mcore_dir)
    seqs, plens = [s for s, _ in SEQS], [p for _, p in SEQS]
    lps = sequence_logprobs(chunks, seqs, plens, cfg.vocab_size, temperature=temperature, micro_batch_size=2)
    width = max(len(s) for s in seqs) - 1
    batch = pack_sequences(SEQS, len(SEQS), width, 0)

    def collect(b, output, non_loss_data=False):
        return token_logprobs(output, b["targets"], vocab_size=cfg.vocab_size, temperature=temperature)

    out = _forward_only(chunks, [batch], collect)
    ent = [e[p - 1:len(s) - 1].tolist() for (s, p), e in zip(SEQS, out[0][1])] if out else None
    return [lp.tolist() for lp in lps], ent


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint and Hugging Face's own log-probs and entropies of the same model (fp32, this process)."""
    from mgs_megatron.convert import hf_to_mcore_checkpoint

    root = tmp_path_factory.mktemp("vp")
    hf = models.build(NAME)
    hf.save_pretrained(root / "hf")
    hf_to_mcore_checkpoint(root / "hf", root / "mcore", progress=False)
    lps, ents = [], []
    with torch.no_grad():
        for s, p in SEQS:
            logits = hf(torch.tensor([s])).logits[0].float() / TEMPERATURE
            logp_all = torch.log_softmax(logits, -1)
            lps.append(logp_all[p - 1:len(s) - 1].gather(-1, torch.tensor(s[p:])[:, None]).squeeze(-1))
            ents.append(-(logp_all.exp() * logp_all).sum(-1)[p - 1:len(s) - 1])
    return str(root / "mcore"), lps, ents


@pytest.mark.parametrize("layout", [Layout(), Layout(tp=2), Layout(pp=2)], ids=str)
def test_token_logprobs_and_entropy_equal_hf(reference, layout):
    mcore_dir, want_lp, want_ent = reference
    results = run_distributed(_rank_logprobs, layout, mcore_dir, TEMPERATURE, timeout=300)
    for lps, ent in results:  # every rank gets the log-probs; the last stage computed the entropy
        for got, want in zip(lps, want_lp):
            assert len(got) == len(want) and (torch.tensor(got) - want).abs().max() <= 1e-5
        if ent is not None:
            for got, want in zip(ent, want_ent):
                assert (torch.tensor(got) - want).abs().max() <= 1e-5
    assert sum(ent is not None for _, ent in results) == layout.world_size // layout.pp  # last stage(s) only


# ------------------------------------------------------------------------------------------ the previous loss
def _previous_logp_and_entropy(logits, targets, vocab_size):
    """mgs_megatron/rl/losses.py as of 11cf1b9 (full-vocabulary fp32 per shard, autograd through it)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    z = logits.float()
    tp = ps.get_tensor_model_parallel_world_size()
    local_v = z.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local_v
    if start + local_v > vocab_size:
        cols = torch.arange(start, start + local_v, device=z.device) >= vocab_size
        z = z.masked_fill(cols, -1e9)
    if tp == 1:
        logp_all = torch.log_softmax(z, -1)
        return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
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
    ez = reduce_from_tensor_model_parallel_region((e * z.clamp_min(-1e4)).sum(-1))
    return logp, log_z - ez / s


def _rank_loss(vocab_size: int, padded: int):
    from megatron.core import parallel_state as ps

    from mgs_megatron.rl import algos, losses

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(3)
    b, s = 3, 6
    full = torch.randn(b, s, padded, generator=g) * 3
    batch = {"targets": torch.randint(0, vocab_size, (b, s), generator=g),
             "loss_mask": (torch.rand(b, s, generator=g) > 0.3).float(),
             "advantages": torch.randn(b, s, generator=g), "old_logp": -torch.rand(b, s, generator=g) * 4,
             "ref_logp": -torch.rand(b, s, generator=g) * 4}
    algo = algos.AlgoConfig(kl_coef=0.05, entropy_coef=0.01, clip_low=0.2, clip_high=0.28)
    shard = full.chunk(tp, dim=-1)[rank]
    new_x = shard.clone().requires_grad_(True)
    new_loss, new_n, new_m = losses.make_rl_loss(algo, vocab_size)(new_x, batch)
    (new_grad,) = torch.autograd.grad(new_loss, new_x)
    old_x = shard.clone().requires_grad_(True)
    logp, ent = _previous_logp_and_entropy(old_x, batch["targets"], vocab_size)
    mask = batch["loss_mask"]
    pg, _ = algos.policy_loss("clip", logp, batch["old_logp"], batch["advantages"], mask, clip_low=0.2,
                              clip_high=0.28)
    kl = algos.kl_penalty("low_var_kl", logp, batch["ref_logp"])
    old_loss = algos.masked_sum(pg, mask) + 0.05 * algos.masked_sum(kl, mask) - 0.01 * algos.masked_sum(ent, mask)
    (old_grad,) = torch.autograd.grad(old_loss, old_x)
    return float(new_loss), float(old_loss), float((new_grad - old_grad).abs().max()), float(old_grad.abs().max())


@pytest.mark.parametrize("layout", [Layout(), Layout(tp=2)], ids=str)
def test_loss_and_gradients_unchanged(layout):
    for new, old, grad_diff, grad_scale in run_distributed(_rank_loss, layout, 101, 102, timeout=120):
        assert math.isclose(new, old, rel_tol=1e-5, abs_tol=1e-5)
        assert grad_diff <= 1e-5 * max(1.0, grad_scale)
