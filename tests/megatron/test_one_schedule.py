"""All domains in ONE schedule call (mgs.one_schedule, domain_step(one_schedule=True)): still exactly the
single-process per-HF-tensor PCGrad reference of test_mgs_exactness, under pipeline parallelism (where the
separation happens inside 1F1B on every stage) and data parallelism, with and without the distributed optimizer."""

from __future__ import annotations

import pytest

from mgs_megatron.testing.harness import Layout, run_distributed
from tests.megatron import test_mgs_exactness as ex


def _one_schedule_train(hf_sd, dist_opt: bool):
    from mgs_megatron import MGSConfig, ModularGradientSurgery
    from mgs_megatron.megatron.domain_step import domain_step
    from mgs_megatron.megatron.schedule import configure_grad_sync, forward_backward

    cfg, chunks, optimizer = ex._setup(hf_sd, dist_opt)
    configure_grad_sync(chunks)
    mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(rule="pcgrad", seed=ex.SEED), ex.DOMAINS,
                                 model_config=cfg)

    def run(batches):
        return forward_backward(chunks, batches, num_microbatches=len(batches), seq_length=ex.SEQ,
                                micro_batch_size=ex.MBS)

    conflicts = 0.0
    for step in range(ex.STEPS):
        res = domain_step(chunks, optimizer, {d: ex._micro_batches(step, d) for d in ex.DOMAINS}, run, mgs=mgs,
                          one_schedule=True)
        assert res.update_ok and len(res.outputs) == (len(ex.DOMAINS) * ex.ROWS // ex.MBS // _dp() if
                                                      _last_stage() else 0)
        conflicts += float((mgs.last_gram < 0).sum())
    return ex._hf_params(chunks, cfg), conflicts


def _dp():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _last_stage():
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True)


@pytest.mark.parametrize("layout", [Layout(pp=2), Layout(dp=2)], ids=str)
def test_one_schedule_matches_single_process_pcgrad(layout):
    want = ex.reference_run("pcgrad", "parameter")
    hf_sd = ex.hf_model().state_dict()
    for dist_opt in (True, False):
        for rank, (params, conflicts) in enumerate(run_distributed(_one_schedule_train, layout, hf_sd, dist_opt,
                                                                   timeout=300)):
            assert conflicts > 0
            ex._assert_close_params(params, want, 1e-5, f"{layout} rank {rank} dist_opt={dist_opt}")
