"""Full-vocabulary logits of a (TP/PP-sharded) Megatron model, for conversion checks.

Uses Megatron's pipeline schedule (forward_only, collect_non_loss_data); the TP-sharded vocab is all-gathered
and the padding stripped. Returns the logits [b, s, vocab] on last-stage ranks and None elsewhere.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _collect(output: torch.Tensor, non_loss_data: bool = False):
    return output.detach()


def _step(batch, data_iterator, model):
    ids = next(data_iterator)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None), _collect


@torch.no_grad()
def megatron_logits(chunks: Sequence[torch.nn.Module], input_ids: torch.Tensor, vocab_size: int
                    ) -> Optional[torch.Tensor]:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = list(chunks)
    was_training = [m.training for m in model]
    for m in model:
        m.eval()
    try:
        out = _forward_only(model, input_ids, get_forward_backward_func)
    finally:
        for m, mode in zip(model, was_training):
            m.train(mode)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = out[0]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size].float()


def _forward_only(model, input_ids, get_forward_backward_func):
    from functools import partial

    return get_forward_backward_func()(
        forward_step_func=partial(_step, None),
        data_iterator=[iter([input_ids]) for _ in model] if len(model) > 1 else iter([input_ids]),
        model=model if len(model) > 1 else model[0],
        num_microbatches=1,
        seq_length=input_ids.shape[1],
        micro_batch_size=input_ids.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )

