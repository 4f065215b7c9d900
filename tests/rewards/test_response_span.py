"""The official recipe's reward inputs: the `<response>` part of a thinking response (rewards/spans.py) for the
reward model and the IF checks, the hf_math_verify path for math, and reward kwargs checked at config time.
Expected values are written from the official code's semantics (StringNLPLAB/MGS fsdp_workers.py W:2181-2200,
hf_math_verify.py H:9-56), not from our output."""
import pytest

from mgs_megatron.rewards import RewardInput, build_reward, unknown_kwargs
from mgs_megatron.rewards.chat_rm import RewardModelReward
from mgs_megatron.rewards.ifeval import IFEvalReward
from mgs_megatron.rewards.math_reward import MathReward
from mgs_megatron.rewards.spans import response_span
from tests.rewards.test_chat_rm import _save_model


@pytest.mark.parametrize("text, want", [
    ("<think> plan </think> <response> Hello, Ana! </response>", "Hello, Ana!"),
    ("<think>a</think><response>one</response> extra <response>two</response>", "one"),  # the first tag pair
    ("<think> plan </think> <response> cut off at max length", "cut off at max length"),  # no closing tag
    ("<think> plan </think> no tags at all", "<think> plan </think> no tags at all"),  # whole response
])
def test_response_tag_span(text, want):
    assert response_span(text, "response_tag") == want
    assert response_span(text, "all") == text


def test_unknown_span_is_refused():
    with pytest.raises(ValueError, match="response_span must be one of"):
        response_span("x", "think")


@pytest.mark.parametrize("gold, resp, official, boxed", [
    # the official path cuts at </response>: the trailing box is not the answer; the last box overall is
    ("4", "<think>maybe \\boxed{5}</think> <response>So \\boxed{4}.</response> junk \\boxed{7}", 1.0, 0.0),
    # no box in the response part: \boxed{<answer is ...>} is verified (0.5 == 1/2)
    ("\\frac{1}{2}", "<think>half</think><response>The answer is 0.5</response>", 1.0, 1.0),
    # a gold that is already boxed is not boxed twice
    ("\\boxed{12}", "<response>\\boxed{12}</response>", 1.0, 1.0),
    ("3", "<response>I do not know.</response>", 0.0, 0.0),
    # thinking only (no <response>): the whole text is the response part
    ("9", "<think>so \\boxed{9}</think>", 1.0, 1.0),
])
def test_hf_math_verify_extraction(gold, resp, official, boxed):
    item = [RewardInput("q", resp, {"answer": gold}, "math")]
    assert MathReward(executor="inline", extraction="hf_math_verify").score_batch(item)[0].score == official
    assert MathReward(executor="inline").score_batch(item)[0].score == boxed


def test_math_verify_extraction_of_the_whole_response():
    from math_verify import parse, verify

    for gold, resp in [("4", "so the result is $\\boxed{4}$"), ("4", "I think 5"), ("\\frac{1}{2}", "it is $0.5$")]:
        want = float(verify(parse(f"\\boxed{{{gold}}}"), parse(resp)))  # math-verify alone, as the reference
        got = MathReward(executor="inline", extraction="math_verify").score_batch([RewardInput("q", resp,
                                                                                               {"answer": gold})])
        assert got[0].score == want


def test_if_reward_checks_the_response_part():
    sample = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    resp = "<think>First, plan; then, write.</think> <response>Hello Ana how are you</response>"
    item = [RewardInput("Greet Ana without commas.", resp, sample, "if")]
    assert IFEvalReward(response_span="response_tag").score_batch(item)[0].score == 1.0
    assert IFEvalReward().score_batch(item)[0].score == 0.0  # the thinking has commas


def test_reward_model_scores_the_response_part_and_counts_truncation(tmp_path, caplog):
    from mgs_megatron.data.toy import build_toy_tokenizer

    path = _save_model(tmp_path / "rm", build_toy_tokenizer(), "qwen2")
    tagged = RewardModelReward(str(path), response_span="response_tag")
    plain = RewardModelReward(str(path))
    answers = ["Hello, Ana!", "Tea is a warm drink."]
    items = [RewardInput("Say hello.", f"<think> long plan here </think> <response> {a} </response>") for a in answers]
    want = [o.score for o in plain.score_batch([RewardInput("Say hello.", a) for a in answers])]
    assert [o.score for o in tagged.score_batch(items)] == pytest.approx(want, abs=1e-6)
    assert tagged.truncated == plain.truncated == 0

    texts = plain.texts([RewardInput("Say hello.", a) for a in answers])
    lengths = [len(plain.tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    short = RewardModelReward(str(path), max_length=min(lengths))  # the longer input is cut, the shorter is not
    with caplog.at_level("WARNING"):
        short.score_batch([RewardInput("Say hello.", a) for a in answers])
    assert short.truncated == sum(n > min(lengths) for n in lengths) == 1
    assert "longer than max_length" in caplog.text


def test_reward_kwargs_are_checked_against_the_reward():
    assert unknown_kwargs(MathReward, {"extraction": "hf_math_verify", "timeout_s": 1}) == []
    assert unknown_kwargs(MathReward, {"extration": "x"}) == ["extration"]
    assert unknown_kwargs(lambda **kw: None, {"anything": 1}) == []
    with pytest.raises(ValueError, match="extraction must be one of"):
        build_reward("math_verify", extraction="regex")
