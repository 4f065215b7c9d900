"""Forward passes of a live (TP/PP-sharded) Megatron model outside training, through Megatron's own schedule.

  sequence_logprobs  per-token log-probs of given sequences, vocab-parallel (the old / reference log-probs)
  last_logits        each row's logits at its last position, TP-gathered: [b, V] (token-by-token generation)
  megatron_logits    full-vocabulary logits of every position (conversion checks on small inputs only)

Inputs are moved to the compute device in the forward step; results come back on the last pipeline stage (and,
for sequence_logprobs, are broadcast to the other stages as one device tensor).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from mgs_megatron.devices import HOST, collective_device, to_compute
from mgs_megatron.megatron.schedule import pack_sequences
from mgs_megatron.megatron.vocab_parallel import token_logprobs


def _step(collect: Callable, data_iterator, model):
    batch = to_compute(next(data_iterator))
    tokens = batch["tokens"]
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None), partial(collect, batch)


def _forward_only(chunks: Sequence[torch.nn.Module], batches: list[dict], collect: Callable) -> list:
    """Megatron's schedule, forward only, over host micro-batches of one shape per call; `collect(batch, output,
    non_loss_data)` runs on the last stage and its results are returned there (elsewhere: [])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = list(chunks)
    modes = [m.training for m in model]
    for m in model:
        m.eval()
    try:
        with torch.no_grad():
            return get_forward_backward_func()(
                forward_step_func=partial(_step, collect),
                data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
                model=model if len(model) > 1 else model[0],
                num_microbatches=len(batches),
                seq_length=batches[0]["tokens"].shape[1],
                micro_batch_size=batches[0]["tokens"].shape[0],
                forward_only=True,
                collect_non_loss_data=True,
            )
    finally:
        for m, mode in zip(model, modes):
            m.train(mode)


def _pp():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size(), ps.is_pipeline_last_stage(ignore_virtual=True)


def _from_last_stage(t: Optional[torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The last pipeline stage's tensor on every stage (one broadcast over the pipeline group)."""
    from megatron.core import parallel_state as ps

    pp, last = _pp()
    if pp == 1:
        return t
    group = ps.get_pipeline_model_parallel_group()
    buf = t.contiguous() if last else torch.empty(numel, dtype=dtype, device=collective_device(group))
    dist.broadcast(buf, src=dist.get_global_rank(group, pp - 1), group=group)
    return buf


def sequence_logprobs(chunks: Sequence[torch.nn.Module], sequences: Sequence[Sequence[int]],
                      prompt_lens: Sequence[int], vocab_size: int, *, temperature: float = 1.0,
                      micro_batch_size: int = 8, pad_id: int = 0) -> list[torch.Tensor]:
    """log p(sequences[i][t] | sequences[i][:t]) for t in [prompt_lens[i], len), under softmax(logits / temperature),
    on every rank, as fp32 host tensors. Micro-batches are padded to their own longest row (to the longest of all
    with pipeline parallelism, where one schedule call needs one shape)."""
    if not sequences:
        return []
    rows = list(zip(sequences, prompt_lens))
    pp, last = _pp()
    common = max(len(s) for s in sequences) - 1 if pp > 1 else None
    batches = []
    for i in range(0, len(rows), micro_batch_size):
        part = rows[i:i + micro_batch_size]
        batches.append(pack_sequences(part, len(part) if pp == 1 else micro_batch_size,
                                      common or max(len(s) for s, _ in part) - 1, pad_id))

    def collect(batch, output, non_loss_data=False):
        return token_logprobs(output, batch["targets"], vocab_size=vocab_size, temperature=temperature,
                              need_entropy=False)[0]

    lengths = [len(s) - p for s, p in rows]
    flat = None
    if last:
        per_batch = _forward_only(chunks, batches, collect)
        pieces = [lp[r, p - 1:len(s) - 1] for k, lp in enumerate(per_batch)
                  for r, (s, p) in enumerate(rows[k * micro_batch_size:(k + 1) * micro_batch_size])]
        flat = torch.cat(pieces) if pieces else torch.zeros(0, device=per_batch[0].device)
    else:
        _forward_only(chunks, batches, collect)
    flat = _from_last_stage(flat, sum(lengths), torch.float32).to(HOST)  # one device -> host copy per call
    return list(flat.split(lengths))


def last_logits(chunks: Sequence[torch.nn.Module], ids: torch.Tensor, lengths: torch.Tensor,
                vocab_size: int) -> Optional[torch.Tensor]:
    """Logits [b, vocab_size] (fp32) at position lengths[i] - 1 of each row of ids [b, w] (on the compute device),
    TP-gathered (only b x V numbers: one position per row), on the last pipeline stage; None elsewhere."""
    from megatron.core import parallel_state as ps

    def collect(batch, output, non_loss_data=False):
        rows = torch.arange(output.shape[0], device=output.device)
        z = output[rows, batch["lengths"] - 1].float()
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(z) for _ in range(tp)]
            dist.all_gather(parts, z.contiguous(), group=ps.get_tensor_model_parallel_group())
            z = torch.cat(parts, dim=-1)
        return z[:, :vocab_size]

    out = _forward_only(chunks, [{"tokens": ids, "lengths": lengths}], collect)
    return out[0] if out else None


@torch.no_grad()
def megatron_logits(chunks: Sequence[torch.nn.Module], input_ids: torch.Tensor, vocab_size: int
                    ) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, vocab_size] (fp32) on last-stage ranks, None elsewhere. For conversion checks
    on a few short prompts: it gathers the whole vocabulary of every position."""
    from megatron.core import parallel_state as ps

    def collect(batch, output, non_loss_data=False):
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(output) for _ in range(tp)]
            dist.all_gather(parts, output.contiguous(), group=ps.get_tensor_model_parallel_group())
            output = torch.cat(parts, dim=-1)
        return output[..., :vocab_size].float()

    out = _forward_only(chunks, [{"tokens": input_ids}], collect)
    return out[0].to(HOST) if out else None


__all__ = ["last_logits", "megatron_logits", "sequence_logprobs"]
