"""Domain-pure micro-batching balanced across data-parallel ranks.

MGS reduces each domain's gradient across DP ranks on its own, so every micro-batch holds one domain only and
every rank runs its domains in the same order (`domain_order`, default: first appearance).

Balancing rule, per domain d with n_d samples:
  1. Split the samples over ranks so rank counts differ by at most one: rank r gets floor(n_d / dp) plus one
     extra for the first n_d mod dp ranks *counting from a rotating offset* (the offset advances by n_d mod dp
     after each domain), so the extras of successive domains land on different ranks and total per-rank counts
     also differ by at most one.
     With `lengths` (tokens per sample) samples are taken longest-first and each goes to the rank with the
     fewest tokens among ranks still below their count (greedy LPT): token loads balance too.
  2. Every rank gets the same number of micro-batches for d: m_d = ceil(ceil(n_d / dp) / micro_batch_size),
     so all ranks take the same number of forward/backward passes per domain (pipeline schedules need a fixed
     count); each rank's samples are cut into m_d nearly equal micro-batches (sizes differ by at most one).
     A micro-batch is empty only if a rank got fewer than m_d samples (e.g. n_d < dp): the trainer must still
     run it (zero loss) so that the collective for domain d happens on every rank.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class MicroBatch:
    domain: str
    indices: list[int] = field(default_factory=list)   # positions in the step's sample list


def _split_counts(n: int, dp: int, offset: int) -> list[int]:
    counts = [n // dp] * dp
    for j in range(n % dp):
        counts[(offset + j) % dp] += 1
    return counts


def _assign(idx: list[int], counts: list[int], lengths: Sequence[int] | None) -> list[list[int]]:
    dp = len(counts)
    if lengths is None:  # contiguous slices keep prompt groups together
        out, start = [], 0
        for c in counts:
            out.append(idx[start:start + c])
            start += c
        return out
    out = [[] for _ in range(dp)]
    heap = [(0, r) for r in range(dp) if counts[r] > 0]
    heapq.heapify(heap)
    for i in sorted(idx, key=lambda i: (-lengths[i], i)):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        if len(out[r]) < counts[r]:
            heapq.heappush(heap, (load + lengths[i], r))
    return [sorted(x) for x in out]


def _cut(idx: list[int], m: int) -> list[list[int]]:
    return [idx[len(idx) * j // m: len(idx) * (j + 1) // m] for j in range(m)]


def plan_microbatches(domains: Sequence[str], micro_batch_size: int, dp_size: int = 1,
                      lengths: Sequence[int] | None = None,
                      domain_order: Sequence[str] | None = None) -> list[list[MicroBatch]]:
    """`domains[i]` is sample i's domain. Returns, per DP rank, its list of domain-pure micro-batches, grouped by
    domain in `domain_order`. Deterministic."""
    if micro_batch_size < 1 or dp_size < 1:
        raise ValueError("micro_batch_size and dp_size must be >= 1")
    if lengths is not None and len(lengths) != len(domains):
        raise ValueError("lengths must have one entry per sample")
    order = list(domain_order) if domain_order is not None else list(dict.fromkeys(domains))
    missing = set(domains) - set(order)
    if missing:
        raise ValueError(f"domains {sorted(missing)} are not in domain_order")
    plan: list[list[MicroBatch]] = [[] for _ in range(dp_size)]
    offset = 0
    for d in order:
        idx = [i for i, x in enumerate(domains) if x == d]
        if not idx:
            continue
        counts = _split_counts(len(idx), dp_size, offset)
        offset = (offset + len(idx) % dp_size) % dp_size
        per_rank = _assign(idx, counts, lengths)
        m = -(-max(counts) // micro_batch_size)
        for r in range(dp_size):
            plan[r].extend(MicroBatch(d, chunk) for chunk in _cut(per_rank[r], m))
    return plan
