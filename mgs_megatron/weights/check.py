"""`--check`: HF logits (this process) vs Megatron logits of a converted checkpoint (TP x PP spawned ranks).

HF runs in the calling process: it is the independent reference, so it shares nothing with the ranks (no CPU
backend, no process group).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mgs_megatron.convert.canonical import read_model_config
from mgs_megatron.convert.torch_dist import is_torch_dist
from mgs_megatron.convert.torch_dist_convert import checkpoint_model_config as checkpoint_config
from mgs_megatron.convert.torch_dist_io import TorchDistReader
from mgs_megatron.devices import HOST
from mgs_megatron.errors import ConversionError
from mgs_megatron.models import ModelConfig


def prompts(vocab_size: int, n: int = 3, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """A few fixed pseudo-random prompts (token ids) of the model's vocabulary."""
    gen = torch.Generator(device=HOST).manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seq), generator=gen, device=HOST)


def checkpoint_model_config(mcore_dir, hf_dir) -> ModelConfig:
    """The ModelConfig of a canonical or torch_dist checkpoint (a foreign torch_dist one: the HF directory's)."""
    if not is_torch_dist(mcore_dir):
        return read_model_config(mcore_dir)
    return checkpoint_config(TorchDistReader(mcore_dir), hf_dir)[0]


def _rank_logits(mcore_dir: str, cfg_dict: dict, ids: list) -> list | None:
    from megatron.core import parallel_state as ps

    from mgs_megatron.megatron.forward import megatron_logits
    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.weights.live import load_weights

    cfg = ModelConfig.from_dict(cfg_dict)
    par = ParallelConfig(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    chunks = [build_gpt_model(cfg, par)]
    load_weights(chunks, mcore_dir)
    out = megatron_logits(chunks, torch.tensor(ids, device=HOST), cfg.vocab_size)
    return None if out is None else out.tolist()


def check_logits(hf_dir, mcore_dir, *, tp: int = 1, pp: int = 1, tol: float = 1e-4, timeout: float = 600) -> float:
    """Max |HF - Megatron| logit difference (fp32) over a few prompts; raises ConversionError above `tol`."""
    import transformers

    from mgs_megatron.megatron.launch import Layout, run_distributed

    cfg = checkpoint_model_config(mcore_dir, hf_dir)
    ids = prompts(cfg.vocab_size)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits.float()
    results = run_distributed(_rank_logits, Layout(tp=tp, pp=pp), str(Path(mcore_dir).absolute()), cfg.to_dict(),
                              ids.tolist(), timeout=timeout)
    got = torch.tensor(next(r for r in results if r is not None), device=HOST)
    diff = (got - ref).abs().max().item()
    if not diff <= tol:
        raise ConversionError(f"logit check failed at tp={tp} pp={pp}: max |HF - Megatron| = {diff:.3g} > {tol}")
    return diff
