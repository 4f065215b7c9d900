"""On ONE GPU (world-1 NCCL group, the local non-TE spec unless Transformer Engine is installed): what the CPU suite
cannot see. Each test reuses the CPU suite's independent references (plain-torch loops, Hugging Face's forward)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mgs_megatron.testing.harness import Layout, run_distributed
from tests.megatron import test_mgs_exactness as ex
from tests.megatron import test_mgs_megatron as tm
from tests.rl.conftest import ROOT, base_overrides

GPU = dict(rank_device="cuda", timeout=900)


def test_mgs_sum_rule_is_the_ordinary_step_bf16_dist_opt():
    """bf16 params, fp32 main grads, distributed optimizer, per-token loss: the same bounds as the CPU test."""
    hf_sd = ex.hf_model().state_dict()
    ((ordinary, main_o), (mgs, main_m)), = run_distributed(tm._ordinary_vs_sum, Layout(), hf_sd, True, False,
                                                           torch.bfloat16, **GPU)
    assert main_o.numel() > 0 and tm._rel(main_m, main_o) <= 1e-6
    for n in ordinary:
        a, b = mgs[n].float(), ordinary[n].float()
        assert bool(((a - b).abs() <= 2.0 ** -7 * torch.maximum(a.abs(), b.abs())).all()), n


def test_mgs_pcgrad_matches_the_per_tensor_reference():
    want = ex.reference_run("pcgrad", "parameter")  # plain PyTorch on the CPU, fp64 projections
    (results,) = run_distributed(ex._mgs_train, Layout(), ex.hf_model().state_dict(),
                                 [("pcgrad", "parameter", True)], **GPU)
    (params, conflicts), = results
    assert conflicts > 0
    ex._assert_close_params(params, want, 1e-5, "one GPU, pcgrad")


def test_compiled_surgery_kernels_match_fp64():
    """The Triton kernels torch.compile generates for the Gram and the combine, against fp64 on the CPU."""
    from mgs_megatron.surgery import ParamLayout, build_segments, combine, gram, pieces_for_shard

    torch.manual_seed(0)
    lays = [ParamLayout(f"w{i}", (1024, 1536)) for i in range(3)]
    n = sum(lay.numel for lay in lays)
    seg = build_segments(pieces_for_shard(lays, 0, n), "parameter")
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        grads = torch.randn(3, n, device="cuda").to(dtype)
        G = gram(seg, grads, kernel="compiled")
        ref = grads.double().cpu()
        want = torch.stack([torch.stack([torch.stack([(ref[i, s:e] * ref[j, s:e]).sum() for i in range(3)])
                                         for j in range(3)]) for s, e, _ in seg.runs])
        assert ((G.double().cpu() - want).abs() / want.abs().amax()).max() <= tol, dtype
        W = torch.randn(seg.num_modules, 3, device="cuda")
        out = torch.empty(n, dtype=dtype, device="cuda")
        combine(seg, grads, W, out, kernel="compiled")
        exp = torch.cat([(W[m].double().cpu()[:, None] * ref[:, s:e]).sum(0) for s, e, m in seg.runs])
        assert ((out.double().cpu() - exp).abs() / exp.abs().amax()).max() <= (2.0 ** -8 if dtype ==
                                                                                  torch.bfloat16 else 1e-6)


def _logits_on_gpu(mcore_dir: str, ids: list):
    from mgs_megatron.convert import read_model_config
    from mgs_megatron.megatron.forward import megatron_logits
    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.weights import load_weights

    cfg = read_model_config(mcore_dir)
    chunks = [build_gpt_model(cfg, ParallelConfig(), device="cuda", initialize=False)]
    load_weights(chunks, mcore_dir)
    return megatron_logits(chunks, torch.tensor(ids, device="cpu"), cfg.vocab_size)


@pytest.mark.parametrize("name", ["qwen2", "llama_tied", "mistral"])
def test_hf_logits_equal_megatron_on_gpu(tmp_path, name):
    from mgs_megatron.convert import hf_to_mcore_checkpoint
    from tests.convert import models

    hf = models.build(name)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_mcore_checkpoint(tmp_path / "hf", tmp_path / "mcore", progress=False)
    ids = models.input_ids()
    with torch.no_grad():
        want = hf(ids).logits.float()
    (got,) = run_distributed(_logits_on_gpu, Layout(), str(tmp_path / "mcore"), ids.tolist(), **GPU)
    assert (got - want).abs().max() < 1e-4


def _train(out, *extra, timeout=900):
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    return subprocess.run([sys.executable, "-m", "mgs_megatron.rl.cli", str(ROOT / "examples" / "tiny_cpu.yaml"),
                           f"run.output_dir={out}", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_trainer_steps_checkpoint_and_bit_exact_resume_on_cuda(tmp_path, toy):
    """2 + 2 MGS steps on CUDA with the Megatron generation backend (vLLM does not travel to the check machine):
    a run crashed after step 2 and resumed ends with the same weights and metrics as the uninterrupted run."""
    # math and chat only: the IFEval checkers (lm-eval) do not travel to the check machine
    common = base_overrides(toy, None)[1:] + [f"data.sources=[{toy['math']},{toy['chat']}]", "launcher.device=cuda",
                                              "launcher.nproc_per_node=1", "strategy=mgs", "run.total_steps=4",
                                              "run.save_every=2", "run.keep_checkpoints=3"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = _train(a, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train(b, "run.fail_at_step=2", *common)
    assert r.returncode != 0
    r = _train(b, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    ma, mb = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()] for d in (a, b)]
    keep = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "mem/", "gpu/", "surgery/seconds"))}  # noqa: E731
    assert [m["step"] for m in mb] == [1, 2, 3, 4] and [keep(m) for m in ma] == [keep(m) for m in mb]
    sa = torch.load(a / "checkpoints" / "step_4" / "rank_0.pt", map_location="cpu", weights_only=False)
    sb = torch.load(b / "checkpoints" / "step_4" / "rank_0.pt", map_location="cpu", weights_only=False)
    for k, v in sa["model"][0].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sb["model"][0][k]), k
