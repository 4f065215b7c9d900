"""Segments: which contiguous slices ("runs") of one flat gradient shard belong to which module.

A `Piece` (layout, start, end, offset): the rank owns elements [start, end) of the parameter's row-major
flattening, stored at flat[offset : offset + end - start].
Pieces may start or end mid-tensor and mid-row (distributed-optimizer shards).

Every rank must use the same module list so that Gram tensors [M, K, K] line up for the all-reduce: build the
local segments once, gather `segments.module_names` from all ranks, and rebuild with
`build_segments(pieces, granularity, module_names=sorted(union))`.

Parameters replicated across TP ranks (norms, replicated biases) must be counted once in the Gram but combined
on every rank: build two Segments with the same module_names, one for `gram` from the pieces without the
duplicates (on TP ranks != 0) and one for `combine` from all pieces (uncovered elements would get the plain sum).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, NamedTuple, Optional, Sequence, Tuple

import torch

from .layout import GRANULARITIES, ParamLayout, module_key, module_layer, module_name, module_type


class Piece(NamedTuple):
    """Elements [start, end) of a parameter's row-major flattening, held at flat[offset : offset + end - start]."""

    layout: ParamLayout
    start: int
    end: int
    offset: int

Run = Tuple[int, int, int]  # (flat_start, flat_end, module_idx)


@dataclass(frozen=True)
class Segments:
    granularity: str
    module_names: Tuple[str, ...]  # global, deterministic order; index = module_idx
    runs: Tuple[Run, ...]  # sorted by flat_start, disjoint, adjacent runs of one module merged
    module_numel: Tuple[int, ...]  # elements of each module held in this shard (0 for remote modules)

    @property
    def num_modules(self) -> int:
        return len(self.module_names)

    @cached_property  # computed once per Segments (frozen dataclass without slots)
    def module_keys(self) -> torch.Tensor:
        """int64 [M] stable keys (see layout.module_key) for rule ordering and rule state."""
        return torch.tensor([module_key(n) for n in self.module_names], dtype=torch.int64, device="cpu")

    @cached_property  # computed once per Segments (frozen dataclass without slots)
    def module_types(self) -> Tuple[str, ...]:
        return tuple(module_type(n) for n in self.module_names)

    @cached_property  # computed once per Segments (frozen dataclass without slots)
    def module_layers(self) -> Tuple[Optional[int], ...]:
        return tuple(module_layer(n) for n in self.module_names)

    @property
    def covered_end(self) -> int:
        return self.runs[-1][1] if self.runs else 0


def _piece_runs(piece: Piece, granularity: str):
    layout, start, end, offset = piece
    start, end, offset = int(start), int(end), int(offset)
    if not 0 <= start <= end <= layout.numel:
        raise ValueError(f"parameter {layout.name!r}: piece [{start}, {end}) outside its {layout.numel} elements")
    if offset < 0:
        raise ValueError(f"parameter {layout.name!r}: negative flat offset {offset}")
    rs = layout.row_numel
    for r0, r1, hf in layout.blocks:
        a, b = max(r0 * rs, start), min(r1 * rs, end)  # intersect block's elements with the owned piece
        if a < b:
            yield offset + a - start, offset + b - start, module_name(layout, hf, granularity)


def local_module_names(pieces: Iterable[Piece], granularity: str) -> Tuple[str, ...]:
    """Sorted names of the modules that the pieces touch (gather these across ranks for the global list)."""
    _check_granularity(granularity)
    return tuple(sorted({name for p in pieces for _, _, name in _piece_runs(p, granularity)}))


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def build_segments(pieces: Iterable[Piece], granularity: str = "parameter",
                   module_names: Optional[Sequence[str]] = None) -> Segments:
    """Runs of a flat shard. `module_names` (optional) fixes the global module list and order; it must contain
    every module the pieces touch. Without it the list is the sorted local module names."""
    _check_granularity(granularity)
    raw = [r for p in pieces for r in _piece_runs(p, granularity)]
    if module_names is None:
        names = tuple(sorted({n for _, _, n in raw}))
    else:
        names = tuple(module_names)
        if len(set(names)) != len(names):
            raise ValueError("module_names contains duplicates")
    index = {n: i for i, n in enumerate(names)}
    missing = sorted({n for _, _, n in raw if n not in index})
    if missing:
        raise ValueError(f"modules {missing[:5]} (of {len(missing)}) are not in the given module_names")
    raw.sort(key=lambda r: r[0])
    runs, numel = [], [0] * len(names)
    for s, e, n in raw:
        m = index[n]
        numel[m] += e - s
        if runs and s < runs[-1][1]:
            raise ValueError(f"flat ranges overlap: module {names[runs[-1][2]]!r} [{runs[-1][0]}, {runs[-1][1]}) "
                             f"and module {n!r} [{s}, {e})")
        if runs and runs[-1][1] == s and runs[-1][2] == m:  # merge: fewer, longer runs = less overhead
            runs[-1] = (runs[-1][0], e, m)
        else:
            runs.append((s, e, m))
    return Segments(granularity, names, tuple(runs), tuple(numel))


def pieces_for_shard(layouts: Sequence[ParamLayout], shard_start: int, shard_end: int,
                     buffer_offsets: Optional[Sequence[int]] = None) -> list:
    """Pieces of a contiguous shard [shard_start, shard_end) of a flat buffer holding `layouts` at
    `buffer_offsets` (default: packed in the given order). Flat offsets are relative to the shard start.
    Convenience for tests and for single-buffer callers; Megatron's glue builds pieces from its own ranges."""
    if buffer_offsets is None:
        buffer_offsets, o = [], 0
        for lay in layouts:
            buffer_offsets.append(o)
            o += lay.numel
    pieces = []
    for lay, off in zip(layouts, buffer_offsets):
        a, b = max(off, shard_start), min(off + lay.numel, shard_end)
        if a < b:
            pieces.append(Piece(lay, a - off, b - off, a - shard_start))
    return pieces
