"""The warm-up demonstrations (mgs_megatron/data/toy.py, used by mgs_megatron/rl/warmup.py) are well-formed: math
demos are right except the noise fraction, IF demos follow their instructions, chat demos are chat_pair responses;
deterministic in the seed. Pure Python (no Megatron)."""

import random

import pytest

from mgs_megatron.data.toy import build_demonstrations, chat_pair, make_chat_rows, make_if_rows, make_math_rows
from mgs_megatron.rewards.ifeval import follow_flags
from mgs_megatron.rewards.math_reward import math_score
from mgs_megatron.rl.warmup import cache_dir, encode_demo

NOISE = 0.25


@pytest.fixture(scope="module")
def rows():
    return make_math_rows(120, random.Random(1)) + make_if_rows(120, random.Random(2)) + \
        make_chat_rows(60, random.Random(3))


@pytest.fixture(scope="module")
def demos(rows):
    return build_demonstrations(rows, NOISE, seed=7)


def test_deterministic_in_seed(rows, demos):
    again = build_demonstrations(rows, NOISE, seed=7)
    assert [(d["response"], d["noisy"]) for d in again] == [(d["response"], d["noisy"]) for d in demos]
    other = build_demonstrations(rows, NOISE, seed=8)
    assert [d["response"] for d in other] != [d["response"] for d in demos]
    assert len(build_demonstrations(rows, NOISE, seed=7, copies=2)) == 2 * len(rows)


def test_noise_fraction(demos):
    frac = sum(d["noisy"] for d in demos) / len(demos)
    assert abs(frac - NOISE) < 0.08
    assert build_demonstrations(make_math_rows(20, random.Random(0)), 0.0, seed=0)[0]["noisy"] is False


def test_math_demos_score_one_except_noise(demos):
    math = [d for d in demos if d["domain"] == "math"]
    assert math
    for d in math:
        assert "\\boxed{" in d["response"]
        assert math_score(str(d["row"]["answer"]), d["response"]) == (0.0 if d["noisy"] else 1.0), d


def test_if_demos_follow_their_instructions(demos):
    ifs = [d for d in demos if d["domain"] == "if"]
    clean = [d for d in ifs if not d["noisy"]]
    assert clean and len(clean) < len(ifs)
    for d in clean:
        flags = follow_flags(d["row"]["instruction_id_list"], d["row"]["kwargs"], d["prompt"], d["response"])
        assert all(flags), (d["prompt"], d["response"], flags)
    noisy_follow = [all(follow_flags(d["row"]["instruction_id_list"], d["row"]["kwargs"], d["prompt"],
                                     d["response"])) for d in ifs if d["noisy"]]
    assert sum(noisy_follow) < len(noisy_follow) / 2  # the noise mostly breaks the instructions


def test_chat_demos_are_chat_pairs(demos):
    chat = [d for d in demos if d["domain"] == "chat"]
    assert chat
    for d in chat:
        good = {chat_pair(d["prompt"], random.Random(s))[0] for s in range(100)}
        assert (d["response"] in good) != d["noisy"], d


def test_encode_demo_ends_with_eos(toy, demos):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(toy["tokenizer"]))
    for d in demos[:: 25]:
        ids, plen = encode_demo(tok, d, max_prompt_len=64, max_response_len=24)
        assert ids[-1] == tok.eos_token_id and 0 < plen < len(ids) <= plen + 24
        assert tok.decode(ids[plen:-1]).strip() == d["response"] or len(ids) == plen + 24


def test_cache_dir_keyed_by_config():
    from mgs_megatron.rl.config import config_from_dict

    base = {"model": {"hf_config": {"hidden_size": 64}, "tokenizer": "t"}, "data": {"sources": ["a.jsonl"]},
            "run": {"output_dir": "runs/x"}, "warmup": {"steps": 10}}
    a = cache_dir(config_from_dict(base))
    assert a == cache_dir(config_from_dict(base, ["run.total_steps=99", "strategy=mixed"]))
    assert a != cache_dir(config_from_dict(base, ["warmup.noise=0.5"]))
    assert a != cache_dir(config_from_dict(base, ["model.hf_config.hidden_size=32"]))
    assert a.parent.name == "runs" and a.name.startswith("warmup-")


def test_warmup_trains_once_then_is_cached(tmp_path, toy):
    """End to end (world 2): a short warm-up is trained and cached next to the run; a second run reuses it."""
    from tests.rl.conftest import base_overrides, mgs_train

    args = base_overrides(toy, None)[1:] + ["warmup.steps=6", "warmup.batch_size=8", "run.total_steps=1",
                                            "strategy=mixed"]
    r = mgs_train([f"run.output_dir={tmp_path / 'a'}"] + args)
    assert r.returncode == 0, r.stderr[-3000:]
    caches = list(tmp_path.glob("warmup-*"))
    assert len(caches) == 1 and (caches[0] / "mgs_checkpoint.json").exists()
    assert "[warm-up] 6 steps" in r.stdout
    r = mgs_train([f"run.output_dir={tmp_path / 'b'}"] + args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[warm-up] cached" in r.stdout and "[warm-up] 6 steps" not in r.stdout
    assert list(tmp_path.glob("warmup-*")) == caches
