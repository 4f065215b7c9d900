"""One optimizer step over micro-batches grouped by domain: the single gradient path of every strategy.

    result = domain_step(chunks, optimizer, {"math": [mb, ...], "chat": [...]}, run_schedule, mgs=mgs)

With `mgs` (a ModularGradientSurgery) each declared domain is entered in declaration order, on every rank, with
its micro-batches or with none (each domain's gradient reduction is a collective), then the surgery and the
optimizer step run. Without it (Mixed and Sequential RL) all micro-batches go through ONE schedule call and the
optimizer steps: the ordinary Megatron step, with no extra schedule call and no stash.

`run_schedule(micro_batches) -> list[loss outputs]` runs the host's forward/backward (e.g. Megatron's
forward_backward_func with the host's loss) over this rank's micro-batches of one group.

A host whose micro-batches mix domains (verl, slime, NeMo-RL, Megatron-LM) calls `mgs_train_step` instead:

    result = mgs_train_step(chunks, optimizer, micro_batches, labels, forward_backward, mgs=mgs)

It splits the host's micro-batches into samples, regroups them into domain-pure micro-batches (the host's
micro-batch size, sample order kept) and runs domain_step; with mgs=None it runs the host's micro-batches as they
are (the host's own step). Losses must be normalised by a count over the whole step, not per micro-batch, so
that the regrouping changes nothing: Megatron's calculate_per_token_loss (MGS divides by the step's global token
count), or a loss the host divides by its own global count and multiplies by the number of micro-batches of the
schedule call (Megatron divides by it), as verl does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from mgs_megatron.megatron.optim import zero_grads

RunSchedule = Callable[[Sequence], list]


@dataclass
class StepResult:
    """What the optimizer step returned, the surgery's statistics (empty without MGS) and the loss outputs of
    every schedule call (on the loss-reporting ranks)."""

    update_ok: bool
    grad_norm: Optional[float]
    num_zeros: Optional[float]
    surgery_stats: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)


def domain_step(chunks, optimizer, groups: Mapping[str, Sequence], run_schedule: RunSchedule,
                mgs=None, one_schedule: bool = False) -> StepResult:
    """See the module docstring. `groups` maps domain -> this rank's micro-batches (domains may be missing).
    `one_schedule` (MGS only): all domains' micro-batches in ONE schedule call, ordered by domain, the gradients
    separated on every stage (mgs.one_schedule: one pipeline fill and drain instead of K, more memory)."""
    outputs: list = []
    if mgs is None:
        zero_grads(chunks, optimizer)
        batches = [mb for mbs in groups.values() for mb in mbs]
        if batches:
            outputs += run_schedule(batches)
        ok, grad_norm, num_zeros = optimizer.step()
        return StepResult(bool(ok), grad_norm, num_zeros, {}, outputs)
    unknown = sorted(set(groups) - set(mgs.domains))
    if unknown:
        raise ValueError(f"micro-batches of undeclared domain(s) {unknown}; MGS domains are {mgs.domains}")
    if one_schedule:
        order = [d for d in mgs.domains for _ in groups.get(d, ())]
        with mgs.one_schedule(order):
            if order:
                outputs += run_schedule([mb for d in mgs.domains for mb in groups.get(d, ())])
    else:
        for d in mgs.domains:  # every rank enters every domain, in the same order
            with mgs.domain(d):
                if groups.get(d):
                    outputs += run_schedule(list(groups[d]))
    ok, grad_norm, num_zeros, stats = mgs.step()
    return StepResult(bool(ok), grad_norm, num_zeros, stats, outputs)


def split_rows(micro_batch: Mapping[str, Any]) -> list[dict]:
    """A micro-batch dict -> one dict per sample (tensors sliced along their first axis, kept 2-D; other values
    shared)."""
    n = next(v.shape[0] for v in micro_batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return [{k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
             for k, v in micro_batch.items()} for i in range(n)]


def cat_rows(samples: Sequence[Mapping[str, Any]], pad: int = 0) -> dict:
    """Samples -> one micro-batch: tensors concatenated along the first axis, 2-D ones right-padded to the longest
    (integer tensors with `pad`, masks and other floats with 0: causal attention leaves real positions unchanged
    and a zero loss mask drops the padding from the loss)."""
    out = {}
    for k, v in samples[0].items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            out[k] = v
            continue
        parts = [s[k] for s in samples]
        if v.dim() == 2:
            width = max(p.shape[1] for p in parts)
            fill = pad if not v.is_floating_point() else 0
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]
        out[k] = torch.cat(parts, dim=0)
    return out


def regroup(samples: Sequence, labels: Sequence[str], domains: Sequence[str], micro_batch_size: int,
            collate: Callable[[Sequence], Any] = cat_rows) -> dict[str, list]:
    """Samples with one domain label each -> {domain: [domain-pure micro-batches of <= micro_batch_size]}, in
    `domains` order, each domain's samples in their original order. ValueError names an unknown label."""
    if len(samples) != len(labels):
        raise ValueError(f"{len(samples)} samples but {len(labels)} domain labels")
    by_domain: dict[str, list] = {d: [] for d in domains}
    for i, (sample, label) in enumerate(zip(samples, labels)):
        if label not in by_domain:
            raise ValueError(f"sample {i} has domain label {label!r}, not one of the declared domains {tuple(domains)}")
        by_domain[label].append(sample)
    return {d: [collate(rows[i:i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size)]
            for d, rows in by_domain.items() if rows}


def mgs_train_step(chunks, optimizer, micro_batches: Sequence, labels: Sequence, forward_backward: RunSchedule, *,
                   mgs=None, micro_batch_size: Optional[int] = None,
                   split: Optional[Callable[[Any], list]] = split_rows,
                   collate: Callable[[Sequence], Any] = cat_rows, one_schedule: bool = False) -> StepResult:
    """One optimizer step over a host's mixed micro-batches (see the module docstring); every rank calls it.

    Args:
        micro_batches: this rank's micro-batches as the host built them (domains mixed); with split=None, samples.
        labels: per micro-batch, the domain of each of its samples (with split=None: one label per sample).
        forward_backward: the host's forward/backward over a list of micro-batches (Megatron's schedule with the
            host's loss); called once per domain under MGS, with that domain's micro-batches only.
        mgs: a ModularGradientSurgery (None: the host's own step, micro-batches unchanged, one schedule call).
        micro_batch_size: samples per regrouped micro-batch (default: the host's largest micro-batch; 1 for
            samples).
        split / collate: micro-batch -> samples and back (default: dicts of tensors, sample axis first).
        one_schedule: all domains in one schedule call (see domain_step).
    Returns what Megatron's own train step has: the loss outputs of the schedule calls and the optimizer's
    (update_ok, grad_norm, num_zeros), plus the surgery's statistics.
    """
    if mgs is None:
        return domain_step(chunks, optimizer, {"all": list(micro_batches)}, forward_backward)
    if split is None:
        samples, flat = list(micro_batches), list(labels)
    else:
        parts = [split(mb) for mb in micro_batches]
        if len(parts) != len(labels) or any(len(p) != len(lab) for p, lab in zip(parts, labels)):
            raise ValueError(f"labels do not match the micro-batches: {[len(p) for p in parts]} samples vs "
                             f"{[len(lab) for lab in labels]} labels")
        samples = [s for p in parts for s in p]
        flat = [lab for lbs in labels for lab in lbs]
    size = micro_batch_size or max([len(p) for p in parts] if split is not None and parts else [1])
    return domain_step(chunks, optimizer, regroup(samples, flat, mgs.domains, size, collate), forward_backward,
                       mgs=mgs, one_schedule=one_schedule)


__all__ = ["StepResult", "cat_rows", "domain_step", "mgs_train_step", "regroup", "split_rows"]
