import pytest

from mgs_megatron.rewards import RewardInput, build_reward
from mgs_megatron.rewards.ifeval import build_checker, ensure_punkt_tab, follow_flags, if_score, instruction_registry

# (instruction id, kwargs, followed response, violating response)
CASES = [
    ("change_case:english_lowercase", {}, "all lowercase here", "Not Lowercase"),
    ("change_case:english_capital", {}, "ALL CAPS HERE", "not caps"),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "THIS and THAT", "only ONE"),
    ("punctuation:no_comma", {}, "no commas here", "one, two"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "three short words",
     "this answer has far too many words in it"),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "One. Two. Three.", "Just one sentence."),
    ("startend:end_checker", {"end_phrase": "That is all."}, "Cats purr. That is all.", "That is all. Cats."),
    ("startend:quotation", {}, '"wrapped"', "not wrapped"),
    ("detectable_format:title", {}, "<<My Title>>\nbody", "no title"),
    ("keywords:existence", {"keywords": ["cats"]}, "I like cats", "I like dogs"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "good words", "bad words"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi."),
    ("language:response_language", {"language": "en"},
     "This is clearly an English sentence about the weather today.",
     "Ceci est clairement une phrase en français sur le temps."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. hi", "hi"),
]


def test_registry_has_25_types():
    assert len(instruction_registry()) == 25


@pytest.mark.parametrize("iid,kw,good,bad", CASES)
def test_followed_and_violated(iid, kw, good, bad):
    assert follow_flags([iid], [kw], "Say hi.", good) == [True]
    assert follow_flags([iid], [kw], "Say hi.", bad) == [False]


def test_fraction_and_none_kwargs_dropped():
    ids = ["punctuation:no_comma", "change_case:english_lowercase"]
    kws = [{"num_words": None}, {}]  # IFEval rows carry unused keys as None
    assert if_score(ids, kws, "", "lower, with comma") == 0.5
    assert if_score(ids, kws, "", "lower no comma") == 1.0
    assert if_score(ids, kws, "", "   ") == 0.0  # empty response follows nothing


def test_missing_kwarg_raises_instead_of_randomising():
    with pytest.raises(ValueError, match="num_words"):
        build_checker("length_constraints:number_words", {"relation": "less than"})


def test_reward_counts_failures():
    r = build_reward("if")
    outs = r.score_batch([
        RewardInput("p", "ok no comma", {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "if"),
        RewardInput("p", "x", {"instruction_id_list": ["nope:unknown"], "kwargs": [{}]}, "if"),
    ])
    assert outs[0].score == 1.0 and outs[0].status == "ok"
    assert outs[1].score == 0.0 and outs[1].status == "failed"


def test_punkt_tab_idempotent(tmp_path):
    root = ensure_punkt_tab(tmp_path)
    f = root / "tokenizers/punkt_tab/english/abbrev_types.txt"
    mtime = f.stat().st_mtime_ns
    ensure_punkt_tab(tmp_path)
    assert f.stat().st_mtime_ns == mtime and f.read_text().strip()
