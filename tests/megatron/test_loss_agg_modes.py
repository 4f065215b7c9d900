"""Every loss_agg_mode under MGS with rule 'sum' equals the ordinary (Mixed) step at DP2: each domain's gradient is
normalised by the step's global count of the mode's unit (tokens or sequences), as Megatron normalises the mixed
step (calculate_per_token_loss), so the per-domain gradients sum to exactly the mixed gradient."""

from __future__ import annotations

import pytest
import torch

from mgs_megatron.rl.algos import LOSS_AGG_MODES
from mgs_megatron.testing.harness import Layout, run_distributed
from tests.megatron import test_mgs_exactness as ex


def _rl_batches(step: int, domain: str) -> list[dict]:
    """The exactness test's token rows with RL fields; response masks of varying length (one row fully masked: a
    padding row, which must not count as a sequence)."""
    from megatron.core import parallel_state as ps

    x, y = ex.domain_rows(step, domain)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    g = torch.Generator().manual_seed(77 + 10 * step + ex.DOMAINS.index(domain))
    lengths = torch.randint(0, ex.SEQ + 1, (x.shape[0],), generator=g)
    mask = (torch.arange(ex.SEQ)[None, :] >= ex.SEQ - lengths[:, None]).float()
    adv = torch.randn(x.shape[0], generator=g)[:, None].expand(-1, ex.SEQ).contiguous()
    old = -torch.rand(x.shape[0], ex.SEQ, generator=g) * 3
    rows = [ex.dp_slice(t, r, dp) for t in (x, y, mask, adv, old)]
    return [{"tokens": rows[0][i:i + ex.MBS], "targets": rows[1][i:i + ex.MBS], "loss_mask": rows[2][i:i + ex.MBS],
             "advantages": rows[3][i:i + ex.MBS], "old_logp": rows[4][i:i + ex.MBS],
             "ref_logp": rows[4][i:i + ex.MBS] - 0.1} for i in range(0, rows[0].shape[0], ex.MBS)]


def _mixed_vs_mgs_sum(hf_sd, mode: str):
    from mgs_megatron import MGSConfig, ModularGradientSurgery
    from mgs_megatron.megatron.domain_step import domain_step
    from mgs_megatron.megatron.schedule import configure_grad_sync, forward_backward
    from mgs_megatron.rl.algos import AlgoConfig
    from mgs_megatron.rl.losses import make_rl_loss

    loss_fn = make_rl_loss(AlgoConfig(loss_agg_mode=mode, kl_coef=0.1, entropy_coef=0.01), ex.VOCAB,
                           temperature=0.7, horizon=ex.SEQ)

    def run(batches):
        return forward_backward(chunks, batches, num_microbatches=len(batches), seq_length=ex.SEQ,
                                micro_batch_size=ex.MBS, loss_fn=loss_fn)

    results = []
    for use_mgs in (False, True):
        cfg, chunks, optimizer = ex._setup(hf_sd, True)
        configure_grad_sync(chunks)
        mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(rule="sum"), ex.DOMAINS, model_config=cfg) \
            if use_mgs else None
        for step in range(2):
            res = domain_step(chunks, optimizer, {d: _rl_batches(step, d) for d in ex.DOMAINS}, run, mgs=mgs)
            assert res.update_ok
        results.append(ex._hf_params(chunks, cfg))
    return results


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_mgs_sum_equals_the_mixed_step_in_every_mode(mode):
    hf_sd = ex.hf_model().state_dict()
    initial = ex.hf_model().state_dict()
    for mixed, mgs in run_distributed(_mixed_vs_mgs_sum, Layout(dp=2), hf_sd, mode, timeout=300):
        moved = max(float((mixed[n] - initial[n]).norm() / initial[n].norm()) for n in initial)
        assert moved > 1e-3, mode
        for n in mixed:
            assert float((mgs[n] - mixed[n]).norm() / mixed[n].norm()) <= 1e-6, (mode, n)
