"""MGS in a host's own Megatron training loop: mixed micro-batches with per-sample domain labels, the host's own
forward-backward and loss, one call per step. Runs on CPU with two ranks (gloo):

    python examples/mgs_in_your_loop.py [--steps 3] [--rule pcgrad]      # re-launches itself with torchrun

Everything but `ModularGradientSurgery` and `mgs_train_step` is the host's: Megatron's DDP, optimizer and
schedule, a token-sum loss with Megatron's calculate_per_token_loss (the step's global token count normalises
it, so rule "sum" is exactly the host's step), and micro-batches that mix three toy domains.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DOMAINS = ("up", "down", "copy")  # next token = x + 1, x - 1, x (mod V): conflicting gradients
VOCAB, SEQ, SAMPLES, MBS = 128, 16, 12, 2


def host_micro_batches(step: int, rank: int):
    """The host's data: SAMPLES rows per rank, the domain of each drawn at random, in mixed micro-batches."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)
    domain = torch.randint(0, len(DOMAINS), (SAMPLES,), generator=g)
    shift = torch.tensor([1, -1, 0])[domain].unsqueeze(1)
    rows = {"tokens": tokens, "labels": (tokens + shift) % VOCAB, "loss_mask": torch.ones(SAMPLES, SEQ)}
    micro_batches = [{k: v[i:i + MBS] for k, v in rows.items()} for i in range(0, SAMPLES, MBS)]
    labels = [[DOMAINS[int(d)] for d in domain[i:i + MBS]] for i in range(0, SAMPLES, MBS)]
    return micro_batches, labels


def loss_func(batch, per_token_loss):
    """Token-sum loss and its token count: with calculate_per_token_loss Megatron divides by the global count."""
    mask = batch["loss_mask"].float()
    loss = (per_token_loss.float() * mask).sum()
    n = mask.sum().to(torch.int)
    return loss, n, {"lm loss": torch.stack([loss.detach(), n.float()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    pos = torch.arange(batch["tokens"].shape[1]).unsqueeze(0).expand_as(batch["tokens"])
    return model(batch["tokens"], pos, None, labels=batch["labels"]), partial(loss_func, batch)


def main(steps: int, rule: str) -> None:
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mgs_megatron import MGSConfig, ModularGradientSurgery
    from mgs_megatron.megatron import parallel
    from mgs_megatron.megatron.domain_step import mgs_train_step
    from mgs_megatron.megatron.model import ParallelConfig, PrecisionConfig, build_gpt_model
    from mgs_megatron.megatron.optim import wrap_ddp
    from mgs_megatron.testing.tiny import TINY_QWEN2

    # --- the host's set-up (any Megatron-Core model, DDP and optimizer will do) ---
    parallel.initialize(ParallelConfig(), seed=1234, device="cpu")  # process groups + Megatron's CPU backend
    model = build_gpt_model(TINY_QWEN2, ParallelConfig(), PrecisionConfig(calculate_per_token_loss=True))
    chunks = wrap_ddp([model], DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0,
                                                       use_distributed_optimizer=True), chunks)
    model.config.finalize_model_grads_func = finalize_model_grads  # the host's own hook: MGS wraps it per domain
    model.config.no_sync_func = chunks[0].no_sync

    def forward_backward(micro_batches):  # the host's forward-backward over a list of micro-batches
        return get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                                           model=chunks[0], num_microbatches=len(micro_batches), seq_length=SEQ,
                                           micro_batch_size=micro_batches[0]["tokens"].shape[0])

    # --- MGS: one object, one call per step ---
    mgs = ModularGradientSurgery(chunks, optimizer, MGSConfig(rule=rule), DOMAINS, model_config=TINY_QWEN2)
    for step in range(steps):
        micro_batches, labels = host_micro_batches(step, dist.get_rank())
        result = mgs_train_step(chunks, optimizer, micro_batches, labels, forward_backward, mgs=mgs)
        totals = torch.stack([o["lm loss"] for o in result.outputs]).sum(0)
        dist.all_reduce(totals)
        if dist.get_rank() == 0:
            s = result.surgery_stats
            print(f"step {step}: loss {float(totals[0] / totals[1]):.4f}  grad_norm {result.grad_norm:.4f}  "
                  f"domains {int(s['surgery/num_domains'])}  modules where up and down conflict "
                  f"{s['surgery/conflicts/up-down']:.0f}", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rule", default="pcgrad")
    a = p.parse_args()
    if "RANK" not in os.environ:  # re-launch on two local ranks
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # Megatron's notes about missing Transformer Engine / apex
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  os.path.abspath(__file__), *sys.argv[1:]])
    main(a.steps, a.rule)
