"""MGS inside a host's own Megatron loop (DP2, distributed optimizer, tiny Qwen2, three conflicting domains):

  * the host rewrites config.finalize_model_grads_func (before MGS is built like verl, between steps like slime,
    between domains, to None inside a domain like NeMo-RL): rule 'sum' still equals the host's ordinary step and
    the host's hook still runs; a hook replaced inside a domain before the schedule raises MGSError naming the field;
  * mgs_train_step on the host's MIXED micro-batches with per-sample labels equals domain_step on the trainer's
    domain-pure micro-batches (rule pcgrad), and with rule 'sum' the host's own step; a DP rank without samples of
    a domain still enters it.
"""

from __future__ import annotations

from mgs_megatron.testing.harness import Layout, run_distributed
from tests.megatron import test_mgs_exactness as ex

DOMAINS = ex.DOMAINS
STEPS = 2


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _counting_hook(calls: list, tag: str):
    from megatron.core.distributed import finalize_model_grads

    def hook(model, num_tokens=None, *args, **kwargs):
        calls.append(tag)
        return finalize_model_grads(model, num_tokens, *args, **kwargs)
    return hook


def _ordinary(hf_sd, calls, batches_of):
    """The host's own step: all micro-batches in one schedule call, through the host's hook."""
    from mgs_megatron.megatron.optim import zero_grads
    from mgs_megatron.megatron.schedule import configure_grad_sync

    cfg, chunks, optimizer = ex._setup(hf_sd, True)
    configure_grad_sync(chunks)
    chunks[0].config.finalize_model_grads_func = _counting_hook(calls, "host")
    for step in range(STEPS):
        zero_grads(chunks, optimizer)
        ex._run_domain(chunks, [b for d in DOMAINS for b in batches_of(step, d)])
        assert optimizer.step()[0]
    return ex._hf_params(chunks, cfg)


def host_rewrites_hook(hf_sd):
    from mgs_megatron import MGSConfig, MGSError, ModularGradientSurgery
    from mgs_megatron.megatron.schedule import configure_grad_sync

    ordinary_calls, calls = [], []
    ordinary = _ordinary(hf_sd, ordinary_calls, ex._micro_batches)
    cfg, chunks, optimizer = ex._setup(hf_sd, True)
    configure_grad_sync(chunks)
    config = chunks[0].config
    config.finalize_model_grads_func = _counting_hook(calls, "built")  # verl: set at optimizer build
    mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(rule="sum"), DOMAINS, model_config=cfg)
    for step in range(STEPS):
        config.finalize_model_grads_func = _counting_hook(calls, f"step{step}")  # slime: at every train() call
        for i, d in enumerate(DOMAINS):
            if step == 1 and i == 1:
                config.finalize_model_grads_func = _counting_hook(calls, "between")  # between two domains
            with mgs.domain(d):
                if step == 1 and i == 2:
                    config.finalize_model_grads_func = None  # NeMo-RL's split step, inside the domain
                ex._run_domain(chunks, ex._micro_batches(step, d))
        assert mgs.step()[0]
    params = ex._hf_params(chunks, cfg)
    left = config.finalize_model_grads_func
    config.finalize_model_grads_func = _counting_hook(calls, "outer")
    try:
        with mgs.domain(DOMAINS[0]):
            config.finalize_model_grads_func = _counting_hook(calls, "inner")  # set inside the domain: refused
            ex._run_domain(chunks, ex._micro_batches(0, DOMAINS[0]))
        error = None
    except MGSError as e:
        error = str(e)
    return ordinary, params, ordinary_calls, calls, left, error


def test_host_rewrites_the_finalize_hook():
    for ordinary, params, ordinary_calls, calls, left, error in run_distributed(
            host_rewrites_hook, Layout(dp=2), ex.hf_model().state_dict(), timeout=300):
        for n in ordinary:
            assert _rel(params[n], ordinary[n]) <= 1e-6, n
        assert ordinary_calls == ["host"] * STEPS
        # MGS wrapped whatever the field held at each domain's entry; None inside a domain: MGS reduced it itself
        assert calls[:6] == ["step0"] * 3 + ["step1", "between", "between"]
        assert left is None  # the host's last choice stands after the domain
        assert calls[6:] == ["inner"] and "finalize_model_grads_func" in error and "inside mgs.domain" in error


def _mixed_micro_batches(step: int, mbs: int = 2):
    """The host's view: this rank's samples of all domains interleaved, in micro-batches of `mbs` mixed samples;
    DP rank 1 has no samples of the last domain."""
    from megatron.core import parallel_state as ps

    rows, labels = [], []
    for d in DOMAINS:
        if d == DOMAINS[-1] and ps.get_data_parallel_rank() == 1:
            continue
        for b in ex._micro_batches(step, d):
            rows.append(b)
            labels.append(d)
    order = sorted(range(len(rows)), key=lambda i: (i % 2, i))  # interleave the domains
    rows, labels = [rows[i] for i in order], [labels[i] for i in order]
    from mgs_megatron.megatron.domain_step import cat_rows

    return ([cat_rows(rows[i:i + mbs]) for i in range(0, len(rows), mbs)],
            [labels[i:i + mbs] for i in range(0, len(rows), mbs)])


def _pure(step: int, d: str):
    from megatron.core import parallel_state as ps

    return [] if d == DOMAINS[-1] and ps.get_data_parallel_rank() == 1 else ex._micro_batches(step, d)


def host_entry_point(hf_sd):
    from mgs_megatron import MGSConfig, ModularGradientSurgery
    from mgs_megatron.megatron.domain_step import domain_step, mgs_train_step
    from mgs_megatron.megatron.schedule import configure_grad_sync, forward_backward

    def fb(batches):
        return forward_backward(chunks, batches, num_microbatches=len(batches), seq_length=ex.SEQ,
                                micro_batch_size=batches[0]["tokens"].shape[0])

    out = {}
    for rule in ("pcgrad", "sum"):
        for path in ("trainer", "host"):
            cfg, chunks, optimizer = ex._setup(hf_sd, True)
            configure_grad_sync(chunks)
            mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(rule=rule, seed=ex.SEED), DOMAINS,
                                         model_config=cfg)
            for step in range(STEPS):
                if path == "trainer":  # the trainer's gradient path: domain-pure micro-batches from the start
                    res = domain_step(chunks, optimizer, {d: _pure(step, d) for d in DOMAINS}, fb, mgs=mgs)
                else:
                    mbs, labels = _mixed_micro_batches(step)
                    res = mgs_train_step(chunks, optimizer, mbs, labels, fb, mgs=mgs)
                assert res.update_ok and res.surgery_stats["surgery/num_domains"] == len(DOMAINS)
            out[rule, path] = ex._hf_params(chunks, cfg)
    cfg, chunks, optimizer = ex._setup(hf_sd, True)  # the host's own step on its mixed micro-batches
    configure_grad_sync(chunks)
    for step in range(STEPS):
        mbs, labels = _mixed_micro_batches(step)
        assert mgs_train_step(chunks, optimizer, mbs, labels, fb).update_ok
    out["host_own"] = ex._hf_params(chunks, cfg)
    return out


def test_mgs_train_step_equals_the_trainer_step_and_the_host_step():
    initial = ex.hf_model().state_dict()
    for out in run_distributed(host_entry_point, Layout(dp=2), ex.hf_model().state_dict(), timeout=300):
        for n in initial:
            assert _rel(out["pcgrad", "host"][n], out["pcgrad", "trainer"][n]) <= 1e-6, n
            assert _rel(out["sum", "host"][n], out["host_own"][n]) <= 1e-6, n
            assert _rel(out["sum", "trainer"][n], out["host_own"][n]) <= 1e-6, n
        moved = max(_rel(out["pcgrad", "host"][n], out["host_own"][n]) for n in initial)
        assert moved > 1e-4  # the projections mattered: pcgrad is not the sum here
