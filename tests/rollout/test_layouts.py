"""Sync from TP2 and PP2 Megatron models into per-rank external_launcher engines (world 2); prompt distribution
(generation split over the 2 engines, every Megatron DP rank ends with its own rollouts)."""

from __future__ import annotations

import pytest

from mgs_megatron.rollout import split_range
from mgs_megatron.testing.harness import Layout, run_distributed
from tests.rollout import models
from tests.rollout.test_sync import check_agreement
from tests.rollout.workers import sync_check_worker

CASES = [(Layout(tp=2), "qwen2"), (Layout(pp=2), "llama_untied"), (Layout(dp=2), "qwen3")]


@pytest.mark.parametrize("layout,arch", CASES, ids=[f"{lay}-{a}" for lay, a in CASES])
def test_sync_layout(tmp_path, layout, arch):
    engine_dir, mcore_dir = models.prepare(arch, tmp_path)
    per_rank = run_distributed(sync_check_worker, layout, engine_dir, mcore_dir, timeout=400)
    total = len(models.PROMPTS) * 2
    for res in per_rank:
        where = f"{arch} at {layout} rank {res['rank']}"
        if layout.dp == 1:  # TP/PP peers: the same (full) rollout list
            check_agreement(res, where, total)
            assert res["rollouts"] == per_rank[0]["rollouts"], where
        else:
            lo, hi = split_range(len(models.PROMPTS), 2, res["rank"])
            assert {p for p, *_ in res["rollouts"]} == set(range(lo, hi)), where
            check_agreement(res, where, (hi - lo) * 2)


def test_split_range():
    assert [split_range(5, 2, i) for i in range(2)] == [(0, 3), (3, 5)]
    assert [split_range(2, 4, i) for i in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
