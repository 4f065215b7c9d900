"""optim.decay_all_params: the official recipe decays every parameter (one AdamW group); Megatron's default exempts
biases and 1-D parameters (norms)."""

import torch

from mgs_megatron.testing.harness import Layout, run_distributed


def _decayed(decay_all: bool):
    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.megatron.optim import OptimConfig, make_trainable
    from mgs_megatron.testing.tiny import TINY_QWEN2

    chunks, opt = make_trainable([build_gpt_model(TINY_QWEN2, ParallelConfig())],
                                 OptimConfig(weight_decay=0.01, decay_all_params=decay_all),
                                 params_dtype=torch.float32, device="cpu")
    out = {"decayed": 0, "exempt": 0, "exempt_1d": 0}
    for o in getattr(opt, "chained_optimizers", [opt]):
        for g in o.optimizer.param_groups:
            for p in g["params"]:
                key = "decayed" if g["weight_decay"] > 0 else "exempt"
                out[key] += 1
                out["exempt_1d"] += key == "exempt" and p.dim() == 1
    return out


def test_decay_all_params():
    (default,) = run_distributed(_decayed, Layout(), False, timeout=120)
    (everything,) = run_distributed(_decayed, Layout(), True, timeout=120)
    assert default["exempt"] > 0 and default["exempt_1d"] == default["exempt"]  # norms and qkv biases exempt
    assert everything["exempt"] == 0 and everything["decayed"] == default["decayed"] + default["exempt"]
