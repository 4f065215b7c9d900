"""One optimizer step over micro-batches grouped by domain: the single gradient path of every strategy.

    result = domain_step(chunks, optimizer, {"math": [mb, ...], "chat": [...]}, run_schedule, mgs=mgs)

With `mgs` (a ModularGradientSurgery) each declared domain is entered in declaration order, on every rank, with
its micro-batches or with none (each domain's gradient reduction is a collective), then the surgery and the
optimizer step run. Without it (Mixed and Sequential RL) all micro-batches go through ONE schedule call and the
optimizer steps: the ordinary Megatron step, with no extra schedule call and no stash.

`run_schedule(micro_batches) -> list[loss outputs]` runs the host's forward/backward (e.g. Megatron's
forward_backward_func with the host's loss) over this rank's micro-batches of one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

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
                mgs=None) -> StepResult:
    """See the module docstring. `groups` maps domain -> this rank's micro-batches (domains may be missing)."""
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
    for d in mgs.domains:  # every rank enters every domain, in the same order
        with mgs.domain(d):
            if groups.get(d):
                outputs += run_schedule(list(groups[d]))
    ok, grad_norm, num_zeros, stats = mgs.step()
    return StepResult(bool(ok), grad_norm, num_zeros, stats, outputs)


__all__ = ["StepResult", "domain_step"]
