"""Megatron-Core's real code on CPU over gloo: parallel state, GPTModel, DDP + optimizers, pipeline schedule.

Every layout is compared with an independent reference: the world-1 run of the same code on the same weights
(and, for the forward, with a plain re-computation of the loss)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mgs_megatron.testing.harness import Layout, run_distributed
from mgs_megatron.testing.tiny import TINY_QWEN2, dp_slice, lm_micro_batches, token_batches

MODEL = TINY_QWEN2
# Adam comparisons use a Llama shape: the k_proj bias of a Qwen2 model has an identically zero true gradient
# (softmax is invariant to a per-query shift of the scores), so Adam turns its float-noise gradient into
# layout-dependent updates. Gradients with qkv bias are compared exactly in the forward/backward test.
ADAM_MODEL = dataclasses.replace(TINY_QWEN2, architecture="llama", qkv_bias=False)
SEQ, ROWS, MBS = 12, 8, 2


def _parallel_state_info():
    from megatron.core import parallel_state as ps

    return dict(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank())


@pytest.mark.parametrize("layout", [Layout(tp=2, dp=2), Layout(pp=2, dp=2), Layout(tp=2, pp=2)], ids=str)
def test_parallel_state(layout):
    infos = run_distributed(_parallel_state_info, layout, timeout=120)
    for info in infos:
        assert (info["tp"], info["pp"], info["dp"]) == (layout.tp, layout.pp, layout.dp)
    coords = {(i["tp_rank"], i["pp_rank"], i["dp_rank"]) for i in infos}
    assert len(coords) == layout.world_size  # every rank has a distinct coordinate


def _forward_backward_loss():
    """Loss and full gradients of one forward/backward (no DDP) on a fixed batch."""
    from megatron.core import parallel_state as ps

    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.megatron.state import full_from_shards, named_global_parameters

    torch.manual_seed(7)
    model = build_gpt_model(MODEL, ParallelConfig(ps.get_tensor_model_parallel_world_size()))
    batch = lm_micro_batches(token_batches(ROWS, SEQ, MODEL.vocab_size, seed=3), ROWS)[0]
    pos = torch.arange(SEQ).expand(ROWS, SEQ)
    per_token = model(batch["tokens"], pos, None, labels=batch["labels"])
    loss = per_token.float().mean()
    loss.backward()
    logits = model(batch["tokens"], pos, None)
    logits = _gather_tp(logits, dim=-1)
    reference = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                  batch["labels"].reshape(-1))
    grads = {}
    tp = ps.get_tensor_model_parallel_world_size()
    for name, p, m in named_global_parameters([model]):
        shards = [torch.empty_like(p.grad) for _ in range(tp)]
        torch.distributed.all_gather(shards, p.grad.contiguous(), group=ps.get_tensor_model_parallel_group())
        grads[name] = full_from_shards(name, shards, p, m.config.gated_linear_unit)
    return loss.item(), reference.item(), grads


def _gather_tp(x: torch.Tensor, dim: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(x) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def test_gpt_forward_backward_same_loss_tp1_tp2():
    (loss1, ref1, grads1), = run_distributed(_forward_backward_loss, Layout(), timeout=120)
    results = run_distributed(_forward_backward_loss, Layout(tp=2), timeout=120)
    assert abs(loss1 - ref1) <= 1e-6 * abs(ref1)  # Megatron's fused CE == plain cross-entropy of its logits
    for loss2, ref2, grads2 in results:
        assert loss2 == pytest.approx(loss1, rel=1e-6)
        assert ref2 == pytest.approx(loss1, rel=1e-6)
        assert grads2.keys() == grads1.keys()
        for name in grads1:
            torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-5, atol=1e-7, msg=name)


def _train(runs, steps: int = 3, init_state=None, num_layers: int = ADAM_MODEL.num_layers):
    """For each (dist_opt, overlap) in runs: Adam steps with Megatron DDP + get_megatron_optimizer through
    Megatron's schedule. Returns, per run, (initial full params, final full params, per-step losses)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.megatron.optim import build_optimizer, wrap_ddp, zero_grads
    from mgs_megatron.megatron.schedule import configure_grad_sync, forward_backward
    from mgs_megatron.megatron.state import gather_full_state_dict, load_full_state_dict

    cfg = dataclasses.replace(ADAM_MODEL, num_layers=num_layers)
    parallel = ParallelConfig(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    results = []
    for dist_opt, overlap in runs:
        torch.manual_seed(11)
        model = build_gpt_model(cfg, parallel)
        if init_state is not None:
            load_full_state_dict([model], init_state)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                                   use_distributed_optimizer=dist_opt,
                                                   bucket_size=4096 if overlap else None)
        chunks = wrap_ddp([model], ddp_config)
        optimizer = build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-3, adam_eps=ADAM_EPS, clip_grad=1.0,
                                                            use_distributed_optimizer=dist_opt))
        configure_grad_sync(chunks)
        initial = gather_full_state_dict(chunks)
        losses = []
        for step in range(steps):
            rows = dp_slice(token_batches(ROWS, SEQ, cfg.vocab_size, seed=100 + step), dp_rank, dp)
            zero_grads(chunks, optimizer)
            out = forward_backward(chunks, lm_micro_batches(rows, MBS), num_microbatches=rows.shape[0] // MBS,
                                   seq_length=SEQ, micro_batch_size=MBS)
            ok, _, _ = optimizer.step()
            assert ok
            losses.append([float(d["lm_loss"][0] / d["lm_loss"][1]) for d in out])
        results.append((initial, gather_full_state_dict(chunks), losses))
    return results


def _assert_same_params(got: dict, want: dict, rtol: float = 1e-6):
    assert got.keys() == want.keys()
    for name in want:
        diff = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-12)
        assert diff <= rtol, f"{name}: relative difference {diff:.2e}"


# Adam's first step is lr * g / (|g| + eps): an element whose gradient is at float-noise level (a sum that cancels
# to ~1e-8) moves by a full +-lr step whose sign depends on summation order, i.e. on the layout. eps = 1e-6 keeps
# such elements from taking full steps without changing the update of ordinary gradients.
ADAM_EPS = 1e-6
RUNS = [(False, False), (False, True), (True, False), (True, True)]  # (distributed optimizer, overlap_grad_reduce)


@pytest.fixture(scope="module")
def world1_reference():
    """World-1 runs: plain DDP (the reference) and the other three variants, which must equal it."""
    (_, ref, _), *others = run_distributed(_train, Layout(), RUNS, timeout=240)[0]
    return ref, [final for _, final, _ in others]


def test_world1_variants_agree(world1_reference):
    ref, others = world1_reference
    for final in others:
        _assert_same_params(final, ref)


@pytest.mark.parametrize("layout", [Layout(dp=2), Layout(tp=2), Layout(tp=2, dp=2)], ids=str)
def test_ddp_optimizer_matches_world1(world1_reference, layout):
    """DDP and the distributed optimizer, overlap_grad_reduce on and off: the same params after 3 Adam steps."""
    ref, _ = world1_reference
    for rank_results in run_distributed(_train, layout, RUNS, timeout=420):
        for (dist_opt, overlap), (_, final, _) in zip(RUNS, rank_results):
            try:
                _assert_same_params(final, ref)
            except AssertionError as e:
                raise AssertionError(f"{layout} dist_opt={dist_opt} overlap={overlap}: {e}") from None


def test_pp2_1f1b_equals_pp1():
    layers = 4
    (init, want, want_losses), = run_distributed(_train, Layout(), [(False, False)], 3, None, layers,
                                                 timeout=180)[0]
    results = run_distributed(_train, Layout(pp=2), [(False, False)], 3, init, layers, timeout=240)
    for (_, params, _), in results:
        _assert_same_params(params, want)
    (_, _, last_stage_losses), = results[1]
    for got, want in zip(last_stage_losses, want_losses):
        assert got == pytest.approx(want, rel=1e-6)


def _activate_report_deactivate():
    from mgs_megatron.megatron import cpu_backend

    cpu_backend.deactivate()  # pooled worker: an earlier task may have activated it (parallel.initialize re-activates)
    original_empty = torch.empty
    patches = cpu_backend.activate()
    on_cpu = torch.empty(2, device="cuda").device.type
    type_name = torch.zeros(1).type()
    cpu_backend.deactivate()
    return patches, on_cpu, type_name, torch.empty is original_empty, cpu_backend.is_active()


def test_cpu_backend_reports_and_reverts():
    (patches, on_cpu, type_name, restored, still_active), = run_distributed(_activate_report_deactivate, 1,
                                                                           timeout=60)
    assert any("current_device" in p for p in patches) and any("_get_cuda_rng_state" in p for p in patches)
    assert on_cpu == "cpu" and type_name == "torch.cuda.FloatTensor"
    assert restored and not still_active


def _hf_load_under_backend(path: str):
    from transformers import AutoModelForCausalLM

    from mgs_megatron.megatron import cpu_backend

    cpu_backend.deactivate()
    cpu_backend.activate()
    try:
        with torch.device("meta"):
            meta_device = torch.tensor([]).device.type
        model = AutoModelForCausalLM.from_pretrained(path)
        return meta_device, {k: v.clone() for k, v in model.named_buffers()}
    finally:
        cpu_backend.deactivate()


def test_hf_loading_under_backend_initialises_buffers(tmp_path):
    """Loading an HF model while the backend is active (as the trainer loads its reward model) must give the same
    non-persistent buffers (rotary inv_freq, built on the meta device) as a clean process."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    want = dict(AutoModelForCausalLM.from_pretrained(tmp_path).named_buffers())
    (meta_device, got), = run_distributed(_hf_load_under_backend, 1, str(tmp_path), timeout=120)
    assert meta_device == "meta"
    assert want.keys() == got.keys() and want
    for k in want:
        assert torch.equal(want[k], got[k]), k
