"""MGS inside Megatron-Core is exactly the paper's per-HF-tensor PCGrad at every parallel layout.

Reference: an unsharded Hugging Face Qwen2 model (plain PyTorch forward/backward, independent of Megatron), the
per-domain gradients of a token-sum loss over the step's global token count, the reference implementation's
per-tensor PCGrad loop (clone, project against the original g_j, sum), clip and Adam. Adam's eps is 1e-4: the
k_proj bias of Qwen2 has an identically zero true gradient (softmax is shift-invariant), and with a tiny eps Adam
turns its float-noise gradient into full steps whose sign depends on summation order, i.e. on the layout.
"""

from __future__ import annotations

import pytest
import torch

from mgs_megatron.testing.harness import Layout, run_distributed
from mgs_megatron.testing.tiny import dp_slice, randomize_hf_params

DOMAINS = ("up", "down", "copy")
VOCAB, SEQ, ROWS, MBS, STEPS, LR, CLIP, ADAM_EPS = 128, 8, 4, 1, 3, 1e-2, 1.0, 1e-4
SEED = 5


def hf_config(num_layers: int = 2):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1e6)


def hf_model(num_layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(num_layers)).float()
    randomize_hf_params(model, matrix_std=0.08, vector_std=0.1)
    return model


def domain_rows(step: int, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Conflicting toy domains: the same kind of random input, labels x+1, x-1 or x (mod V)."""
    g = torch.Generator().manual_seed(1000 * step + DOMAINS.index(domain))
    x = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    shift = {"up": 1, "down": -1, "copy": 0}[domain]
    return x, (x + shift) % VOCAB


# ---------------------------------------------------------------- the reference (plain PyTorch, one process)
def reference_pcgrad(per_domain: list[dict], names: list[str], granularity: str, step: int, seed: int) -> dict:
    """The reference implementation's loop: per tensor (or the whole model), clone each g_i, project it against
    the original g_j (j in the random order of the other domains) when <g_i', g_j> < 0, sum the projections."""
    from mgs_megatron.surgery import domain_orders, module_key

    K = len(per_domain)
    groups = [[n] for n in names] if granularity == "parameter" else [list(names)]
    out = {}
    for group in groups:
        key = module_key(group[0] if granularity == "parameter" else "global")
        order = domain_orders(seed, step, torch.tensor([key]), K)[0].tolist()
        flat = [torch.cat([d[n].double().flatten() for n in group]) for d in per_domain]
        total = torch.zeros_like(flat[0])
        for i in range(K):
            gi = flat[i].clone()
            for j in order[i]:
                dot = torch.dot(gi, flat[j])
                nj = torch.dot(flat[j], flat[j])
                if dot < 0 and nj > 0:
                    gi = gi - dot / nj * flat[j]
            total += gi
        offset = 0
        for n in group:
            numel = per_domain[0][n].numel()
            out[n] = total[offset:offset + numel].view_as(per_domain[0][n]).float()
            offset += numel
    return out


def reference_run(rule: str, granularity: str, num_layers: int = 2) -> dict:
    model = hf_model(num_layers)
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=LR, eps=ADAM_EPS)
    for step in range(STEPS):
        total_tokens = len(DOMAINS) * ROWS * SEQ
        per_domain = []
        for d in DOMAINS:
            model.zero_grad()
            x, y = domain_rows(step, d)
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum")
            (loss / total_tokens).backward()
            per_domain.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        if rule == "sum":
            combined = {n: sum(g[n] for g in per_domain) for n in names}
        else:
            combined = reference_pcgrad(per_domain, names, granularity, step, SEED)
        for n, p in model.named_parameters():
            p.grad = combined[n].clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- Megatron + MGS (every rank)
def _setup(hf_sd, dist_opt: bool, overlap: bool = False, per_token: bool = True, params_dtype=torch.float32,
           num_layers: int = 2):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from mgs_megatron.devices import compute_device
    from mgs_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_gpt_model
    from mgs_megatron.megatron.optim import build_optimizer, wrap_ddp
    from mgs_megatron.megatron.state import load_full_state_dict
    from mgs_megatron.models import model_config_from_hf
    from mgs_megatron.models.mapping import convert_hf_state_dict

    cfg = model_config_from_hf(hf_config(num_layers))
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    parallel = ParallelConfig(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                              vpp)
    precision = PrecisionConfig(params_dtype=params_dtype, calculate_per_token_loss=per_token)
    device = compute_device().type  # cpu here; cuda in tests/gpu (the same helpers, one GPU)
    models = [build_gpt_model(cfg, parallel, precision, device=device, vp_stage=v) for v in range(vpp or 1)]
    load_full_state_dict(models, convert_hf_state_dict(hf_sd, cfg))
    chunks = wrap_ddp(models, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap, use_distributed_optimizer=dist_opt,
        bucket_size=2048 if overlap else None), device=device)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=CLIP,
        use_distributed_optimizer=dist_opt, bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype))
    return cfg, chunks, optimizer


def _micro_batches(step: int, domain: str, rows_for_rank=None) -> list[dict]:
    from megatron.core import parallel_state as ps

    x, y = domain_rows(step, domain)
    if rows_for_rank is None:
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        x, y = dp_slice(x, r, dp), dp_slice(y, r, dp)
    else:
        x, y = x[rows_for_rank], y[rows_for_rank]
    return [{"tokens": x[i:i + MBS], "labels": y[i:i + MBS], "loss_mask": torch.ones(MBS, SEQ)}
            for i in range(0, x.shape[0], MBS)]


def _run_domain(chunks, batches):
    from mgs_megatron.megatron.schedule import forward_backward

    if batches:
        forward_backward(chunks, batches, num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=MBS)


def _hf_params(chunks, cfg):
    from mgs_megatron.megatron.state import gather_full_state_dict
    from mgs_megatron.models.mapping import convert_mcore_state_dict

    return convert_mcore_state_dict(gather_full_state_dict(chunks), cfg)


def _mgs_train(hf_sd, runs, overlap=False, params_dtype=torch.float32, num_layers=2, kernel="auto"):
    from mgs_megatron import MGSConfig, ModularGradientSurgery

    results = []
    for rule, granularity, dist_opt in runs:
        cfg, chunks, optimizer = _setup(hf_sd, dist_opt, overlap, params_dtype=params_dtype, num_layers=num_layers)
        mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(rule=rule, granularity=granularity, seed=SEED,
                                                                  kernel=kernel), DOMAINS, model_config=cfg)
        conflicts = 0.0
        for step in range(STEPS):
            for d in DOMAINS:
                with mgs.domain(d):
                    _run_domain(chunks, _micro_batches(step, d))
            ok, _, _, stats = mgs.step()
            assert ok
            conflicts += float((mgs.last_gram < 0).sum())
        results.append((_hf_params(chunks, cfg), conflicts))
    return results


LAYOUTS = [Layout(), Layout(dp=2), Layout(tp=2), Layout(pp=2), Layout(tp=2, dp=2), Layout(tp=2, pp=2)]
RUNS = [(rule, gran, dist_opt) for rule, gran in (("pcgrad", "parameter"), ("pcgrad", "global"))
        for dist_opt in (False, True)]


@pytest.fixture(scope="module")
def references():
    return {gran: reference_run("pcgrad", gran) for gran in ("parameter", "global")}


def _assert_close_params(got: dict, want: dict, rtol: float, what: str):
    assert got.keys() == want.keys(), what
    for n in want:
        diff = float((got[n].float() - want[n]).norm() / want[n].norm().clamp(min=1e-12))
        assert diff <= rtol, f"{what}: {n} relative difference {diff:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_mgs_matches_single_process_pcgrad(references, layout):
    hf_sd = {k: v.clone() for k, v in hf_model().state_dict().items()}
    initial = hf_model().state_dict()
    for rank, rank_results in enumerate(run_distributed(_mgs_train, layout, hf_sd, RUNS, timeout=600)):
        for (rule, gran, dist_opt), (params, conflicts) in zip(RUNS, rank_results):
            what = f"{layout} rank {rank} {rule}/{gran} dist_opt={dist_opt}"
            assert conflicts > 0, f"{what}: the domains never conflicted; the test would not see projections"
            _assert_close_params(params, references[gran], 1e-5, what)
            moved = max(float((params[n] - initial[n]).norm() / initial[n].norm()) for n in initial)
            assert moved > 1e-2, f"{what}: parameters barely moved ({moved:.1e})"


def _mgs_train_compiled(hf_sd, runs):
    import mgs_megatron.surgery.compiled as compiled

    return _mgs_train(hf_sd, runs, kernel="compiled"), sorted(compiled._compiled)


def test_mgs_compiled_kernels_match_single_process_pcgrad(references):
    """kernel='compiled' (torch.compile'd Gram and combine; here on the embedding, the output layer and the
    global module's long runs) inside Megatron's distributed optimizer at DP2 with the CPU backend active."""
    runs = [("pcgrad", "parameter", True), ("pcgrad", "global", True)]
    for rank, (rank_results, compiled) in enumerate(run_distributed(_mgs_train_compiled, Layout(dp=2), hf_model(
            ).state_dict(), runs, timeout=600)):
        assert compiled == ["pair_sums", "weighted_sum_"], f"rank {rank}: compiled kernels not used ({compiled})"
        for (rule, gran, _), (params, conflicts) in zip(runs, rank_results):
            assert conflicts > 0
            _assert_close_params(params, references[gran], 1e-5, f"dp2 rank {rank} compiled {gran}")


def test_pcgrad_differs_from_sum(references):
    """Guard: with these domains the projections change the result (else the layout tests prove little)."""
    plain = reference_run("sum", "parameter")
    diffs = [float((plain[n] - references["parameter"][n]).norm() / plain[n].norm()) for n in plain]
    assert max(diffs) > 1e-3


def test_mgs_virtual_pipeline_chunks():
    """Interleaved 1F1B with two model chunks per stage (PP4 x VPP2, 8 layers): the same single-process PCGrad.
    (PP2 x VPP2 is not a valid interleaved layout: both directions of the ring go to the same peer, and Megatron's
    batched send/recv pairs then mismatch activations and gradients -- Megatron-LM itself asks for PP > 2.)"""
    want = reference_run("pcgrad", "parameter", num_layers=8)
    hf_sd = hf_model(8).state_dict()
    for rank_results in run_distributed(_mgs_train, Layout(pp=4, vpp=2), hf_sd, [("pcgrad", "parameter", True)],
                                        num_layers=8, timeout=500):
        (params, conflicts), = rank_results
        assert conflicts > 0
        _assert_close_params(params, want, 1e-5, "pp4 x vpp2")
