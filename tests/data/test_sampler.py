import copy
import math

import pytest

from mgs_megatron.data import DataConfig, PromptSample, PromptSampler


def _data(sizes):
    return {d: [PromptSample(f"{d}-{i}", d, f"{d} prompt {i}", None, {}) for i in range(n)]
            for d, n in sizes.items()}


DATA = _data({"math": 50, "if": 30, "chat": 7})
PROPS = {"math": 0.5, "if": 0.3, "chat": 0.2}


def _uids(batch):
    return [p.uid for p in batch]


@pytest.mark.parametrize("mix", ["quota", "random"])
def test_proportions_within_sampling_error(mix):
    n_steps, per_step = 400, 10
    s = PromptSampler(DataConfig(proportions=PROPS, prompts_per_step=per_step, mix=mix), DATA, seed=3)
    counts = {d: 0 for d in PROPS}
    for _ in range(n_steps):
        batch = s.next_step()
        assert len(batch) == per_step
        for p in batch:
            counts[p.domain] += 1
    total = n_steps * per_step
    for d, p in PROPS.items():
        sigma = math.sqrt(total * p * (1 - p))
        assert abs(counts[d] - total * p) <= 4 * sigma
        if mix == "quota":  # exact long-run counts
            assert abs(counts[d] - total * p) <= 1


def test_quota_gives_every_domain_every_step():
    s = PromptSampler(DataConfig(proportions=PROPS, prompts_per_step=10), DATA)
    for _ in range(20):
        assert [p.domain for p in s.next_step()] == ["math"] * 5 + ["if"] * 3 + ["chat"] * 2


def test_without_replacement_within_epoch_and_seeded():
    a = PromptSampler(DataConfig(proportions={"chat": 1}, prompts_per_step=7), DATA, seed=1)
    b = PromptSampler(DataConfig(proportions={"chat": 1}, prompts_per_step=7), DATA, seed=1)
    c = PromptSampler(DataConfig(proportions={"chat": 1}, prompts_per_step=7), DATA, seed=2)
    first = _uids(a.next_step())
    assert sorted(first) == sorted(p.uid for p in DATA["chat"])
    assert first == _uids(b.next_step()) and first != _uids(c.next_step())


@pytest.mark.parametrize("mix", ["quota", "random"])
def test_resume_yields_identical_next_prompts(mix):
    cfg = DataConfig(proportions=PROPS, prompts_per_step=9, mix=mix)
    s = PromptSampler(cfg, DATA, seed=7)
    for _ in range(13):  # crosses epoch boundaries of the small chat domain
        s.next_step()
    state = copy.deepcopy(s.state_dict())
    expected = [_uids(s.next_step()) for _ in range(10)]
    r = PromptSampler(cfg, DATA, seed=7)
    r.load_state_dict(state)
    assert [_uids(r.next_step()) for _ in range(10)] == expected
    with pytest.raises(ValueError):
        PromptSampler(DataConfig(proportions=PROPS), DATA, seed=8).load_state_dict(state)


def test_sequential_schedule():
    cfg = DataConfig(prompts_per_step=4, stages=[("math", 2), ("if", 3), ("chat", 1)])
    s = PromptSampler(cfg, DATA, schedule="sequential")
    doms = [{p.domain for p in s.next_step()} for _ in range(8)]
    assert doms == [{"math"}] * 2 + [{"if"}] * 3 + [{"chat"}] * 3  # last stage continues
    s2 = PromptSampler(DataConfig(proportions=PROPS, steps_per_stage=1, prompts_per_step=2), DATA,
                       schedule="sequential")
    assert [s2.next_step()[0].domain for _ in range(3)] == ["math", "if", "chat"]


def test_bad_config():
    with pytest.raises(ValueError, match="no prompts"):
        PromptSampler(DataConfig(proportions={"code": 1.0}), DATA)
    with pytest.raises(ValueError):
        PromptSampler(DataConfig(), DATA, schedule="random")
