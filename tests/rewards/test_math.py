import pytest

from mgs_megatron.rewards import RewardInput, build_reward
from mgs_megatron.rewards.math_reward import extract_answer, last_boxed, math_score


def test_last_boxed_nested_and_last():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{\sqrt{2}}}.") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed 7") == "7"
    assert last_boxed(r"ok \boxed{3} broken \boxed{4") == "3"
    assert last_boxed("none") is None


@pytest.mark.parametrize("text,ans,method", [
    (r"so \boxed{5}", "5", "boxed"),
    ("The answer is 0.5.", "0.5", "answer_is"),
    ("Final answer: $\\frac{3}{4}$", "\\frac{3}{4}", "answer_is"),
    ("I got 3 apples then 7/2", "7/2", "last_number"),
    ("no digits here", None, "none"),
])
def test_extract(text, ans, method):
    assert extract_answer(text) == (ans, method)


def test_boxed_only_fallback():
    assert extract_answer("answer is 5", fallback="boxed_only") == (None, "none")


CASES = [  # gold, response, expected
    (r"\frac{1}{2}", r"\boxed{0.5}", 1.0),
    ("0.5", r"\boxed{\frac{1}{2}}", 1.0),
    (r"\frac{3}{4}", r"\boxed{\dfrac{3}{4}}", 1.0),
    (r"\frac{3}{4}", r"\boxed{3/4}", 1.0),
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}", 0.0),
    ("{1,2}", r"\boxed{\{2, 1\}}", 1.0),
    (r"\{1,2\}", r"\boxed{\{1,3\}}", 0.0),
    ("[1,2)", r"\boxed{[1, 2)}", 1.0),
    ("[1,2)", r"\boxed{(1,2)}", 0.0),
    ("5", r"\boxed{5 \text{ cm}}", 1.0),
    ("5", r"\boxed{6\text{cm}}", 0.0),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\sqrt{2}/2}", 1.0),
    ("7", "first 3, then \\boxed{4} and finally \\boxed{7}", 1.0),
    ("7", "The answer is 7.", 1.0),
    ("12", "nothing", 0.0),
]


@pytest.mark.parametrize("gold,resp,expected", CASES)
def test_math_score_inline(gold, resp, expected):
    assert math_score(gold, resp) == expected


def test_math_reward_process_batch():
    r = build_reward("math", timeout_s=10)
    try:
        items = [RewardInput("q", resp, {"answer": gold}, "math") for gold, resp, _ in CASES]
        items.append(RewardInput("q", r"\boxed{1}", {}, "math"))  # missing gold -> failure, not a crash
        outs = r.score_batch(items)
        assert [o.score for o in outs[:-1]] == [e for _, _, e in CASES]
        assert all(o.status == "ok" for o in outs[:-1])
        assert outs[-1].status == "failed" and outs[-1].score == 0.0
    finally:
        r.close()
