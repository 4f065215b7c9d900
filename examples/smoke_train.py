"""Smoke run: a tiny Qwen-shaped Megatron GPTModel trained a few Adam steps on CPU (gloo), world 2.

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 examples/smoke_train.py [--tp 2]

Real Megatron-Core code throughout: parallel_state, GPTModel (local spec), DDP with the distributed optimizer,
get_megatron_optimizer, and the pipeline schedule. Prints the loss of each step; it must fall.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

from mgs_megatron.megatron import parallel
from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
from mgs_megatron.megatron.optim import build_optimizer, wrap_ddp, zero_grads
from mgs_megatron.megatron.schedule import configure_grad_sync, forward_backward
from mgs_megatron.testing.tiny import TINY_QWEN2, dp_slice, lm_micro_batches, token_batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    layout = ParallelConfig(args.tp, args.pp)
    layout.check(TINY_QWEN2, dist.get_world_size() if dist.is_initialized() else None)
    device = parallel.initialize(layout, seed=1234, device=args.device)
    model = build_gpt_model(TINY_QWEN2, layout)
    chunks = wrap_ddp([model], DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                             use_distributed_optimizer=True), device=device)
    optimizer = build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0,
                                                        use_distributed_optimizer=True))
    configure_grad_sync(chunks)
    rows = token_batches(16, 32, TINY_QWEN2.vocab_size, seed=0)  # one fixed batch: the loss must fall on it
    rows = dp_slice(rows, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    rank = dist.get_rank()
    if rank == 0:
        print(f"[smoke] world={dist.get_world_size()} tp={args.tp} pp={args.pp} "
              f"dp={ps.get_data_parallel_world_size()} device={device}", flush=True)
    for step in range(args.steps):
        zero_grads(chunks, optimizer)
        out = forward_backward(chunks, lm_micro_batches(rows, 4), num_microbatches=rows.shape[0] // 4,
                               seq_length=32, micro_batch_size=4)
        ok, grad_norm, _ = optimizer.step()
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            stats = torch.stack([d["lm_loss"] for d in out]).sum(0)
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
            if ps.get_data_parallel_rank() == 0:
                print(f"[smoke] step {step}  loss {float(stats[0] / stats[1]):.4f}  grad_norm {grad_norm:.3f}",
                      flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
