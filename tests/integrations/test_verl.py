"""MGS inside verl 0.9.1's real Megatron engine (MegatronEngineWithLMHead through EngineRegistry, mbridge, bf16,
distributed optimizer), CPU, gloo, world 2 (DP2), three conflicting domains by `data_source`. Gradients are compared
as the optimizer steps on them (fp32 main grads, full tensors):

  batch A (DP rank 1 has no rows of one domain):
  * rule "sum" through the adapter == verl's own train_batch (the same per-row bf16 backward, summed in another
    order); with dynamic batch sizes, within the bf16 rounding that packing rows differently brings;
  * each domain's gradient the adapter stashed == verl's own train_batch on that domain's rows alone, its loss
    normalised by the whole mini-batch's token count: domain purity and verl's normaliser;
  * rule "pcgrad" == the reference per-HF-tensor PCGrad (float64) of those domain gradients;
  batch B (every rank has every domain):
  * rule "pcgrad" through the adapter == our trainer's MGS step (domain_step over the domain-pure sub-batches, each
    through verl's own forward_backward_batch with the whole batch's normaliser).
(Our own schedule and loss on the same weights differ from verl's forward-backward by bf16 rounding - verl
normalises the loss before the backward, we after the reduction - so that path cannot be compared exactly.)

Runs in .venv-verl (tools/install.sh --verl); the CPU patches verl needs are in verl_cpu.py.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mgs_megatron.testing.harness import run_distributed

pytestmark = pytest.mark.skipif(importlib.util.find_spec("verl") is None,
                                reason="verl is not installed here (its environment: tools/install.sh --verl)")
DOMAINS = ("math", "code", "ifeval")
SHIFT = {"math": 1, "code": -1, "ifeval": 0}  # next token = x + 1, x - 1, x (mod V): conflicting domains
BATCHES = {"A": {0: ["math", "code", "math", "ifeval", "code", "math"], 1: ["code", "code", "math", "math"]},
           "B": {0: ["ifeval", "math", "code", "code"], 1: ["math", "ifeval", "code", "math", "ifeval"]}}
VOCAB, CYCLE = 128, 8


def make_model(out) -> None:
    """A tiny Qwen2 + word-level tokenizer, saved locally (verl's HFModelConfig loads both from the path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from mgs_megatron.testing.tiny import randomize_hf_params

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(out)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    randomize_hf_params(model, matrix_std=0.08, vector_std=0.1)
    model.to(torch.bfloat16).save_pretrained(out)


def rows(batch: str, dp_rank: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(domain, token ids, loss mask) of this DP rank's rows: the loss covers each row's second half."""
    g = torch.Generator().manual_seed(100 + dp_rank + 10 * ord(batch))
    out = []
    for d in BATCHES[batch][dp_rank]:
        n = int(torch.randint(8, 14, (1,), generator=g))
        start = int(torch.randint(0, CYCLE, (1,), generator=g))
        ids = (start + SHIFT[d] * torch.arange(n)) % CYCLE + 3  # few tokens: the domains share contexts
        out.append((d, ids, torch.cat([torch.zeros(n - n // 2), torch.ones(n // 2)]).long()))
    return out


def verl_batch(batch: str, dp_rank: int, dynamic: bool = False):
    from tensordict import NonTensorStack
    from verl.utils import tensordict_utils as tu

    rs = rows(batch, dp_rank)
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    return tu.get_tensordict(
        tensor_dict={"input_ids": nested([r[1] for r in rs]), "loss_mask": nested([r[2] for r in rs]),
                     "position_ids": nested([torch.arange(len(r[1])) for r in rs]),
                     "data_source": NonTensorStack(*[r[0] for r in rs])},
        non_tensor_dict={"temperature": 1.0, "use_remove_padding": False, "use_dynamic_bsz": dynamic,
                         "micro_batch_size_per_gpu": 1, "max_token_len_per_gpu": 24,
                         "global_batch_size": sum(len(v) for v in BATCHES[batch].values()),
                         "pad_mode": "no_padding"})


def full_grads(chunks) -> dict[str, torch.Tensor]:
    """The gradient the (distributed) optimizer steps on, as full fp32 tensors by parameter name."""
    import torch.distributed as dist

    from mgs_megatron.megatron.state import unwrap

    out = {}
    for chunk in chunks:
        names = {p: n for n, p in unwrap(chunk).named_parameters()}
        for buffer in chunk.buffers:
            group = buffer.data_parallel_group
            dp, r = group.size(), group.rank()
            for bucket in buffer.buckets:
                n = bucket.grad_data.numel()
                lo, hi = bucket.offset + r * n // dp, bucket.offset + (r + 1) * n // dp
                for p in bucket.params_list:
                    start, end, _ = buffer.param_index_map[p]
                    t = torch.zeros(p.numel(), dtype=torch.float32)
                    a, b = max(start, lo), min(end, hi)
                    if a < b:
                        t[a - start:b - start] = buffer.grad_data[a:b].float()
                    dist.all_reduce(t, group=group)
                    out[names[p]] = t.view(p.shape)
    return out


def _capture(optimizer, chunks, into: list) -> None:
    step = optimizer.step

    def captured():
        into.append(full_grads(chunks))
        return step()
    optimizer.step = captured


def verl_rank(model_dir: str) -> dict:
    from functools import partial

    from tests.integrations import verl_cpu

    verl_cpu.apply()
    from verl.trainer.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import HFModelConfig, McoreEngineConfig, McoreOptimizerConfig
    from verl.workers.engine import EngineRegistry
    from verl.workers.utils.losses import sft_loss

    from mgs_megatron.integrations import verl as adapter

    engine = EngineRegistry.new(
        model_type="language_model", backend="megatron",
        model_config=HFModelConfig(path=model_dir, use_remove_padding=False),
        engine_config=McoreEngineConfig(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
            sequence_parallel=False, use_distributed_optimizer=True, use_mbridge=True, vanilla_mbridge=True,
            dtype="bfloat16", use_dynamic_bsz=False, micro_batch_size_per_gpu=1, use_remove_padding=False, seed=1,
            override_transformer_config={"sequence_parallel": False, "mgs": {"domains": list(DOMAINS),
                                                                             "rule": "sum"}}),
        optimizer_config=McoreOptimizerConfig(lr=0.0, total_training_steps=10, weight_decay=0.0, clip_grad=0.0),
        checkpoint_config=CheckpointConfig())
    assert isinstance(engine, adapter.MGSMegatronEngine)
    engine.initialize()
    grads: list = []
    _capture(engine.optimizer, engine.module, grads)
    dp_rank = engine.get_data_parallel_rank()
    results = {}

    def train(name, mgs, batch, loss_function):
        engine.mgs = mgs
        with engine.train_mode():
            out = engine.train_batch(batch, loss_function=loss_function)
        results[name] = grads[-1]
        if engine.is_mp_src_rank_with_outputs():
            results[name + "_grad_norm"] = float(out["metrics"]["grad_norm"])

    def pcgrad():
        return adapter.build_mgs(engine, {"domains": DOMAINS, "rule": "pcgrad", "seed": 3})

    loss = partial(sft_loss, config=None)
    for batch in ("A", "B"):
        data = verl_batch(batch, dp_rank)
        labels = [r[0] for r in rows(batch, dp_rank)]
        every = _tokens(data)

        def whole_batch_loss(model_output, data, dp_group=None, every=every):  # the whole batch's tokens, as MGS
            tu.assign_non_tensor(data, batch_num_tokens=every)
            return sft_loss(None, model_output, data, dp_group)

        def domain_rows(d, data=data, labels=labels):
            return tu.index_select_tensor_dict(data, [i for i, x in enumerate(labels) if x == d])

        if batch == "A":
            mgs_sum, mgs_pc = engine.mgs, pcgrad()
            train("verl", None, data.clone(), loss)
            train("sum", mgs_sum, data.clone(), loss)
            train("pcgrad", mgs_pc, data.clone(), loss)
            results["stashed"] = {d: mgs_pc.stashed_gradient(d) for d in DOMAINS}
            for d in ("math", "code"):  # verl's own step on one domain's rows (every DP rank has some)
                train(f"verl_{d}", None, domain_rows(d), whole_batch_loss)
            dynamic = verl_batch(batch, dp_rank, dynamic=True)  # micro-batches packed by token count
            train("verl_dynamic", None, dynamic.clone(), loss)
            train("sum_dynamic", mgs_sum, dynamic.clone(), loss)
        else:
            train("pcgrad_B", pcgrad(), data.clone(), loss)
            results["trainer_B"] = our_trainer_step(engine, {d: [domain_rows(d)] for d in DOMAINS},
                                                    whole_batch_loss, pcgrad())
    return results


def _tokens(data) -> float:
    """The batch's loss tokens over both DP ranks."""
    import torch.distributed as dist

    n = torch.tensor([float(sum(int(t.sum()) for t in data["loss_mask"].unbind()))])
    dist.all_reduce(n)
    return float(n)


def our_trainer_step(engine, groups: dict, loss_function, mgs) -> dict:
    """Our trainer's gradient path: domain_step over domain-pure groups, the host's forward-backward per domain."""
    from mgs_megatron.megatron.domain_step import domain_step

    grads: list = []
    _capture(engine.optimizer, engine.module, grads)
    with engine.train_mode():
        engine.optimizer_zero_grad()
        domain_step(engine.module, engine.optimizer, groups,
                    lambda bs: [engine.forward_backward_batch(bs[0], loss_function, forward_only=False)], mgs=mgs)
    return grads[-1]


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in b)
    return (num / sum(float(b[k].norm() ** 2) for k in b)) ** 0.5


def _hf(grads: dict, cfg) -> dict:
    from mgs_megatron.models.mapping import convert_mcore_state_dict

    return convert_mcore_state_dict(grads, cfg)


def test_verl_engine_sum_is_verls_step_and_pcgrad_is_our_trainers(tmp_path):
    from mgs_megatron.models import model_config_from_hf
    from tests.megatron.test_mgs_exactness import reference_pcgrad

    make_model(tmp_path / "hf")
    cfg = model_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    r = run_distributed(verl_rank, 2, str(tmp_path / "hf"), timeout=400)[0]
    assert len(r["verl"]) == 17, sorted(r["verl"])
    assert _rel(r["sum"], r["verl"]) <= 1e-5
    # dynamic batch sizes (rows packed by token count; one rank lacks a domain, verl makes as many micro-batches on
    # every rank): packing other rows together changes only bf16 rounding (verl's own step moves as much between
    # its fixed and dynamic modes), well under 2^-7; a wrong normaliser or a lost domain is orders larger
    assert _rel(r["sum_dynamic"], r["verl_dynamic"]) <= 2.0 ** -7
    assert abs(r["sum_grad_norm"] - r["verl_grad_norm"]) <= 1e-5 * r["verl_grad_norm"]
    for d in ("math", "code"):
        assert _rel(r["stashed"][d], r[f"verl_{d}"]) <= 1e-5, d
    stashed = [_hf(r["stashed"][d], cfg) for d in DOMAINS]
    want = reference_pcgrad(stashed, sorted(stashed[0]), "parameter", step=0, seed=3)
    assert _rel(_hf(r["pcgrad"], cfg), want) <= 1e-5
    assert _rel(r["pcgrad"], r["sum"]) > 1e-2  # the projections matter here
    assert _rel(r["pcgrad_B"], r["trainer_B"]) <= 1e-6
