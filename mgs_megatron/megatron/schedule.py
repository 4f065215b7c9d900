"""Megatron's own forward/backward schedules (any PP) around a language-model loss on token micro-batches.

A micro-batch is a dict with `tokens` [b, s] (int64), `labels` (or `targets`) [b, s] and `loss_mask` [b, s] (float),
built on the host (`pack_sequences`) and moved to the compute device in one place, the forward step
(devices.to_compute); `position_ids` is derived when absent. `loss_fn(per_token_loss_or_logits, batch) -> (loss,
num_tokens, metrics)` may be swapped for an RL policy loss.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Sequence

import torch

from mgs_megatron.devices import HOST, to_compute

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, dict]]


def token_mean_lm_loss(per_token_loss: torch.Tensor, batch: dict):
    """Cross-entropy summed over masked tokens; returned with the token count (Megatron divides)."""
    mask = batch["loss_mask"].to(per_token_loss.dtype)
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm_loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def is_loss_reporting_rank() -> bool:
    """Whether this rank's loss outputs count: the last pipeline stage, TP rank 0 (other TP ranks hold copies)."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0


def sum_reported(stats: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum, in place) per-rank sums of loss outputs over the world, counting each micro-batch once."""
    import torch.distributed as dist

    if not is_loss_reporting_rank():
        stats.zero_()
    dist.all_reduce(stats)
    return stats


def configure_grad_sync(ddp_chunks: Sequence[torch.nn.Module]) -> None:
    """Let Megatron's schedules drive DDP: no_sync during accumulation, finalize_model_grads at the end."""
    from megatron.core.distributed import finalize_model_grads

    config = ddp_chunks[0].config if hasattr(ddp_chunks[0], "config") else ddp_chunks[0].module.config
    no_sync = [c.no_sync for c in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads


def pack_sequences(rows: Sequence[tuple[Sequence[int], int]], micro_batch_size: int, seq_len: int, pad: int,
                   target_key: str = "targets") -> dict:
    """Rows of (token ids, prompt length) -> one micro-batch dict of [micro_batch_size, seq_len] host tensors:
    `tokens` = ids[:-1], `target_key` = ids[1:] (next-token targets), `loss_mask` = 1 where the target is a
    response token. Rows past len(rows) are padding (mask 0), so every rank runs the same micro-batch shape."""
    b = {"tokens": torch.full((micro_batch_size, seq_len), pad, dtype=torch.long, device=HOST),
         target_key: torch.full((micro_batch_size, seq_len), pad, dtype=torch.long, device=HOST),
         "loss_mask": torch.zeros(micro_batch_size, seq_len, device=HOST)}
    for row, (ids, prompt_len) in enumerate(rows):
        s = torch.as_tensor(ids, dtype=torch.long, device=HOST)
        n = len(ids) - 1
        b["tokens"][row, :n] = s[:-1]
        b[target_key][row, :n] = s[1:]
        b["loss_mask"][row, prompt_len - 1:n] = 1.0
    return b


def pad_batches(batches: Sequence[dict], seq_len: int, pad: int) -> list[dict]:
    """Micro-batches right-padded to seq_len (tokens and targets with `pad`, masks with 0): causal attention keeps
    every real position's output unchanged."""
    out = []
    for b in batches:
        extra = seq_len - b["tokens"].shape[1]
        if extra <= 0:
            out.append(b)
            continue
        fill = {k: pad if v.dtype == torch.long else 0 for k, v in b.items() if isinstance(v, torch.Tensor)}
        out.append({k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) if k in fill and v.dim() == 2 else v
                    for k, v in b.items()})
    return out


def _forward_step(loss_fn: LossFn, data_iterator, model):
    batch = to_compute(next(data_iterator))
    tokens = batch["tokens"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=batch.get("labels"))
    # A (loss, num_tokens, metrics) triple: Megatron divides by num_tokens and num_microbatches itself unless
    # config.calculate_per_token_loss, in which case finalize_model_grads divides by the global token count.
    return output, partial(loss_fn, batch=batch)


def forward_backward(ddp_chunks: Sequence[torch.nn.Module], micro_batches: Iterable[dict], *, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, loss_fn: LossFn | None = None,
                     forward_only: bool = False) -> list[dict]:
    """Run get_forward_backward_func() over this rank's micro-batches; returns the last stage's loss dicts."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    loss_fn = loss_fn or token_mean_lm_loss
    model = list(ddp_chunks)
    batches = list(micro_batches)
    iterators = [iter(batches) for _ in model]  # one per virtual-pipeline chunk: each consumes every micro-batch
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iterators[0] if len(model) == 1 else iterators,
        model=model[0] if len(model) == 1 else model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
