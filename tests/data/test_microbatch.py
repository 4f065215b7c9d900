import random

import pytest

from mgs_megatron.data import plan_microbatches


def _check(plan, domains, mbs):
    seen = []
    for rank in plan:
        for mb in rank:
            assert {domains[i] for i in mb.indices} <= {mb.domain}  # domain-pure
            assert len(mb.indices) <= mbs
            seen.extend(mb.indices)
    assert sorted(seen) == list(range(len(domains)))  # every sample exactly once


@pytest.mark.parametrize("dp,mbs", [(1, 2), (2, 2), (3, 4), (4, 1)])
def test_domain_pure_and_balanced(dp, mbs):
    rng = random.Random(dp * 10 + mbs)
    domains = [rng.choice(["math", "if", "chat"]) for _ in range(37)]
    plan = plan_microbatches(domains, mbs, dp, domain_order=["math", "if", "chat"])
    _check(plan, domains, mbs)
    order = [[mb.domain for mb in rank] for rank in plan]
    assert all(o == order[0] for o in order)  # same domain sequence and micro-batch count on every rank
    for d in ("math", "if", "chat"):
        per_rank = [sum(len(mb.indices) for mb in rank if mb.domain == d) for rank in plan]
        assert max(per_rank) - min(per_rank) <= 1
    totals = [sum(len(mb.indices) for mb in rank) for rank in plan]
    assert max(totals) - min(totals) <= 1  # rotating remainder balances totals too


def test_token_balancing():
    domains = ["math"] * 8
    lengths = [100, 90, 10, 10, 10, 10, 5, 5]
    plan = plan_microbatches(domains, 2, 2, lengths=lengths)
    _check(plan, domains, 2)
    loads = [sum(lengths[i] for mb in rank for i in mb.indices) for rank in plan]
    assert max(loads) - min(loads) <= 20


def test_tiny_domain_gives_empty_microbatch_on_extra_ranks():
    plan = plan_microbatches(["math", "chat", "chat", "chat"], 4, 2)
    assert [[(mb.domain, len(mb.indices)) for mb in r] for r in plan] == [[("math", 1), ("chat", 1)],
                                                                          [("math", 0), ("chat", 2)]]


def test_pack_sequences_shifts_targets_and_masks_response_tokens():
    import torch

    from mgs_megatron.megatron.schedule import pack_sequences

    b = pack_sequences([([1, 2, 3, 4, 5], 2), ([7, 8, 9], 1)], micro_batch_size=3, seq_len=5, pad=0)
    assert b["tokens"].tolist() == [[1, 2, 3, 4, 0], [7, 8, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert b["targets"].tolist() == [[2, 3, 4, 5, 0], [8, 9, 0, 0, 0], [0, 0, 0, 0, 0]]
    # prompt [1, 2] -> response 3, 4, 5 are the targets at positions 1..3; prompt [7] -> 8, 9 at 0..1
    assert b["loss_mask"].tolist() == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert b["loss_mask"].dtype == torch.float32 and b["tokens"].dtype == torch.long
    assert set(pack_sequences([], 1, 2, 0, target_key="labels")) == {"tokens", "labels", "loss_mask"}
