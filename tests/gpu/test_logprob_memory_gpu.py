"""Peak GPU memory of one training step of a Qwen2.5-1.5B-shaped model (random weights, bf16, one 4096-token
response): printed beside what the previous full-vocabulary log-prob path would have added (its fp32 [s, V] copies),
and bounded by the card."""

from __future__ import annotations

import torch

from mgs_megatron.testing.harness import Layout, run_distributed

QWEN25_15B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536,
                  intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  hidden_act="silu")


def _one_step(response_tokens: int, prompt_tokens: int):
    from mgs_megatron.devices import compute_device
    from mgs_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_gpt_model
    from mgs_megatron.megatron.optim import OptimConfig, make_trainable
    from mgs_megatron.megatron.schedule import forward_backward, pack_sequences
    from mgs_megatron.models import model_config_from_hf
    from mgs_megatron.rl.algos import AlgoConfig
    from mgs_megatron.rl.losses import make_rl_loss

    cfg = model_config_from_hf(QWEN25_15B)
    precision = PrecisionConfig(params_dtype=torch.bfloat16, calculate_per_token_loss=True)
    model = build_gpt_model(cfg, ParallelConfig(), precision, device="cuda")
    chunks, opt = make_trainable([model], OptimConfig(lr=1e-6, micro_batch_size=1), params_dtype=torch.bfloat16,
                                 device="cuda")
    n = prompt_tokens + response_tokens
    g = torch.Generator(device="cpu").manual_seed(0)
    seq = torch.randint(0, cfg.vocab_size, (n,), generator=g, device="cpu").tolist()
    batch = pack_sequences([(seq, prompt_tokens)], 1, n - 1, 0)
    for k in ("advantages", "old_logp", "ref_logp"):
        batch[k] = torch.zeros(1, n - 1, device="cpu") - (1.0 if k != "advantages" else -0.5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(chunks, [batch], num_microbatches=1, seq_length=n - 1, micro_batch_size=1,
                     loss_fn=make_rl_loss(AlgoConfig(), cfg.vocab_size, temperature=0.7))
    opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert compute_device().type == "cuda"
    return {"peak_gib": peak / 2**30, "before_gib": before / 2**30, "tokens": n - 1, "vocab": cfg.vocab_size,
            "card_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}


def test_step_memory_qwen25_15b_shape():
    (r,) = run_distributed(_one_step, Layout(), 4096, 128, rank_device="cuda", timeout=900)
    # the previous loss path kept an fp32 copy, its log_softmax, exp and product: 4 x [s, V] fp32 at least
    old_extra = 4 * r["tokens"] * r["vocab"] * 4 / 2**30
    print(f"\none training step, Qwen2.5-1.5B shape, {r['tokens']} tokens: peak {r['peak_gib']:.2f} GiB "
          f"(weights + optimizer {r['before_gib']:.2f} GiB); the previous log-prob path would add >= "
          f"{old_extra:.2f} GiB of fp32 vocabulary-sized tensors")
    assert r["peak_gib"] < r["card_gib"]
