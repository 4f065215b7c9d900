"""MGS plug-in behaviour beyond exactness: rule 'sum' is the ordinary Megatron step, domain purity, absent
domains, bf16 params, overlap, and bad input."""

from __future__ import annotations

import pytest
import torch

from mgs_megatron.testing.harness import DistributedTestError, Layout, run_distributed
from tests.megatron import test_mgs_exactness as ex

DOMAINS = ex.DOMAINS


def _ordinary_vs_sum(hf_sd, dist_opt: bool, overlap: bool, params_dtype=torch.float32, absent=()):
    """Params after 3 ordinary Megatron steps (all domains' micro-batches in one schedule call) and after 3 MGS
    steps with rule 'sum' (one schedule call per domain), from the same weights. `absent` domains skip a step."""
    from mgs_megatron import MGSConfig, ModularGradientSurgery
    from mgs_megatron.megatron.optim import zero_grads
    from mgs_megatron.megatron.schedule import configure_grad_sync

    def batches(step):
        return {d: ex._micro_batches(step, d) for d in DOMAINS if (step, d) not in absent}

    cfg, chunks, optimizer = ex._setup(hf_sd, dist_opt, overlap, params_dtype=params_dtype)
    configure_grad_sync(chunks)
    for step in range(ex.STEPS):
        zero_grads(chunks, optimizer)
        all_batches = [b for bs in batches(step).values() for b in bs]
        ex._run_domain(chunks, all_batches)
        assert optimizer.step()[0]
    ordinary = ex._hf_params(chunks, cfg), _main_params(optimizer)

    cfg, chunks, optimizer = ex._setup(hf_sd, dist_opt, overlap, params_dtype=params_dtype)
    mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(rule="sum"), DOMAINS, model_config=cfg)
    for step in range(ex.STEPS):
        for d, bs in batches(step).items():
            with mgs.domain(d):
                ex._run_domain(chunks, bs)
        ok, _, _, stats = mgs.step()
        assert ok and stats["surgery/num_domains"] == len(batches(step))
    return ordinary, (ex._hf_params(chunks, cfg), _main_params(optimizer))


def _main_params(optimizer) -> torch.Tensor:
    """This rank's fp32 main parameters, as the inner Adam updates them (the shard, with the distributed
    optimizer); the same order in every run of the same layout."""
    return torch.cat([p.detach().float().flatten() for o in getattr(optimizer, "chained_optimizers", [optimizer])
                      for g in o.optimizer.param_groups for p in g["params"]])


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("layout", [Layout(dp=2), Layout(tp=2, dp=2), Layout(pp=2)], ids=str)
def test_sum_rule_is_the_ordinary_step(layout):
    hf_sd = ex.hf_model().state_dict()
    absent = {(1, "down")}  # a domain absent from one step
    for dist_opt, overlap in ((False, False), (True, True)):
        for (ordinary, _), (mgs, _) in run_distributed(_ordinary_vs_sum, layout, hf_sd, dist_opt, overlap,
                                                       absent=absent, timeout=400):
            for n in ordinary:
                assert _rel(mgs[n], ordinary[n]) <= 1e-6, f"{layout} dist_opt={dist_opt}: {n}"


def test_sum_rule_bf16_params_fp32_grads():
    """bf16 parameters with fp32 main grads / params in the distributed optimizer. What is exact in fp32 is compared
    in fp32: the main parameters (the same bound as the fp32 runs: the two paths differ only in the order of fp32
    gradient sums). The bf16 parameters are each main parameter rounded once, so where two fp32 values that differ
    by that reduction-order error straddle a bf16 rounding boundary they may land one bf16 ulp apart, and never more:
    |a - b| <= 2^-7 max(|a|, |b|) elementwise (7 stored mantissa bits)."""
    hf_sd = ex.hf_model().state_dict()
    for (ordinary, main_o), (mgs, main_m) in run_distributed(_ordinary_vs_sum, Layout(dp=2), hf_sd, True, False,
                                                             torch.bfloat16, timeout=400):
        assert main_o.numel() > 0 and _rel(main_m, main_o) <= 1e-6
        for n in ordinary:
            a, b = mgs[n].float(), ordinary[n].float()
            ulp = 2.0 ** -7 * torch.maximum(a.abs(), b.abs())
            assert bool(((a - b).abs() <= ulp).all()), n


def _purity(hf_sd, dist_opt: bool):
    """DP rank 0 holds only domain A ('up') micro-batches, rank 1 only B ('down'); both enter both domains."""
    from megatron.core import parallel_state as ps

    from mgs_megatron import MGSConfig, ModularGradientSurgery

    cfg, chunks, optimizer = ex._setup(hf_sd, dist_opt, per_token=False)
    mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(), ("up", "down"), model_config=cfg)
    rank = ps.get_data_parallel_rank()
    for d, owner in (("up", 0), ("down", 1)):
        with mgs.domain(d):
            ex._run_domain(chunks, ex._micro_batches(0, d, rows_for_rank=slice(0, 2)) if rank == owner else [])
    return {d: mgs.stashed_gradient(d) for d in ("up", "down")}


def test_domain_purity():
    """The stashed A gradient is the DP mean of A's gradient alone (B's micro-batches on the other rank never mix
    in): compared with a plain Hugging Face backward over rank 0's A rows, divided by DP = 2."""
    from mgs_megatron.models import model_config_from_hf
    from mgs_megatron.models.mapping import convert_mcore_state_dict

    model = ex.hf_model()
    hf_sd = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model_config_from_hf(ex.hf_config())
    want = {}
    for d in ("up", "down"):
        model.zero_grad()
        x, y = ex.domain_rows(0, d)
        x, y = x[0:2], y[0:2]
        losses = [torch.nn.functional.cross_entropy(model(input_ids=x[i:i + 1]).logits.float().reshape(-1, ex.VOCAB),
                                                    y[i].reshape(-1)) for i in range(2)]
        (sum(losses) / len(losses) / 2).backward()  # mean over micro-batches, DP mean with an idle rank
        want[d] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for dist_opt in (False, True):
        for got in run_distributed(_purity, Layout(dp=2), hf_sd, dist_opt, timeout=300):
            for d in ("up", "down"):
                hf = convert_mcore_state_dict(got[d], cfg)
                for n in want[d]:
                    assert _rel(hf[n], want[d][n]) <= 1e-5, f"dist_opt={dist_opt} domain {d}: {n}"


def _bad_inputs(hf_sd):
    from mgs_megatron import MGSConfig, MGSError, ModularGradientSurgery

    cfg, chunks, optimizer = ex._setup(hf_sd, False)
    errors = {}
    try:
        ModularGradientSurgery([c.module for c in chunks], optimizer, MGSConfig(), DOMAINS)
    except MGSError as e:
        errors["unwrapped"] = str(e)
    mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(), DOMAINS, model_config=cfg)
    try:
        mgs.step()
    except MGSError as e:
        errors["no_domain"] = str(e)
    try:
        with mgs.domain("poetry"):
            pass
    except MGSError as e:
        errors["undeclared"] = str(e)
    try:
        with mgs.domain("up"):
            with mgs.domain("down"):
                pass
    except MGSError as e:
        errors["nested"] = str(e)
    try:
        MGSConfig(rule="magic")
    except ValueError as e:
        errors["rule"] = str(e)
    try:
        ModularGradientSurgery(chunks, optimizer, MGSConfig(), (), model_config=cfg)
    except MGSError as e:
        errors["domains"] = str(e)
    return errors


def test_bad_input_errors():
    (errors,) = run_distributed(_bad_inputs, Layout(), ex.hf_model().state_dict(), timeout=200)
    assert "not megatron.core DistributedDataParallel" in errors["unwrapped"]
    assert "step() with no domain" in errors["no_domain"]
    assert "'poetry' was not declared" in errors["undeclared"]
    assert "cannot nest" in errors["nested"]
    assert "'magic'" in errors["rule"]
    assert "declare the domains" in errors["domains"]


def test_harness_reports_rank_failure():
    # Rank 0 may report first (its barrier loses rank 1's connection); the report must still lead with rank 1.
    with pytest.raises(DistributedTestError, match=r"^_fail_on_rank1 at 2: rank 1 failed:\n(.|\n)*ValueError: boom"):
        run_distributed(_fail_on_rank1, 2, timeout=60)


def test_harness_reports_root_cause_when_peer_reports_first():
    with pytest.raises(DistributedTestError, match=r"^_fail_on_rank1_late at 2: rank 1 failed:\n(.|\n)*boom late"):
        run_distributed(_fail_on_rank1_late, 2, timeout=60)


def _fail_on_rank1_late():
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        dist.destroy_process_group()  # rank 0's barrier now fails and reports first
        time.sleep(2)
        raise ValueError("boom late")
    return 0


def test_failure_report_puts_root_cause_first():
    from mgs_megatron.megatron.launch import _failure_report

    lost = "RuntimeError: [pair.cc:537] Read error [127.0.0.1]:11401: Connection reset by peer."
    report = _failure_report("f at 2", {0: lost, 1: "ValueError: boom"})
    assert report.startswith("f at 2: rank 1 failed:\nValueError: boom")
    assert "(then rank 0 failed:" in report
    assert _failure_report("f at 2", {1: "A", 0: "B"}).startswith("f at 2: rank 1 failed:\nA")


def _fail_on_rank1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom")
    return 0


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Main parameters and every Adam moment, in a fixed order."""
    out = []
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        for g in o.optimizer.param_groups:
            for p in g["params"]:
                out.append(p.detach().clone())
                out += [v.detach().clone() for v in o.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return out


def _skip_on_nonfinite(hf_sd):
    from mgs_megatron import MGSConfig, ModularGradientSurgery
    from mgs_megatron.megatron.schedule import forward_backward, token_mean_lm_loss

    def nan_loss(per_token_loss, batch):
        return token_mean_lm_loss(per_token_loss * float("nan"), batch)

    cfg, chunks, optimizer = ex._setup(hf_sd, True)
    mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(rule="gradvac", on_nonfinite="skip_step"), DOMAINS,
                                 model_config=cfg)
    for d in DOMAINS:
        with mgs.domain(d):
            ex._run_domain(chunks, ex._micro_batches(0, d))
    assert mgs.step()[0]
    before, state, rule = ex._hf_params(chunks, cfg), _optimizer_tensors(optimizer), mgs.rule.state_dict()
    for d in DOMAINS:
        with mgs.domain(d):
            mbs = ex._micro_batches(1, d)
            forward_backward(chunks, mbs, num_microbatches=len(mbs), seq_length=ex.SEQ, micro_batch_size=ex.MBS,
                             loss_fn=nan_loss if d == "down" else None)
    ok, grad_norm, _, stats = mgs.step()
    after, state2 = ex._hf_params(chunks, cfg), _optimizer_tensors(optimizer)
    same_rule = all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                    for a, b in zip(rule.values(), mgs.rule.state_dict().values()))
    return (ok, stats["surgery/nonfinite_modules"], all(torch.equal(before[n], after[n]) for n in before),
            len(state) > 0 and all(torch.equal(a, b) for a, b in zip(state, state2)), same_rule, mgs.step_count)


def test_skip_step_on_nonfinite_leaves_parameters_and_optimizer_state():
    """on_nonfinite='skip_step' (the official code skips a step with a non-finite gradient norm): one domain's
    gradient is NaN -> no update; parameters, Adam moments, main parameters and the rule's state are untouched."""
    for ok, bad, params_same, state_same, rule_same, steps in run_distributed(
            _skip_on_nonfinite, Layout(dp=2), ex.hf_model().state_dict(), timeout=300):
        assert not ok and bad > 0 and params_same and state_same and rule_same and steps == 2
