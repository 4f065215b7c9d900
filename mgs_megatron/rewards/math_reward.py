"""Math reward: extract the final answer, check equivalence with math-verify, score 0/1.

Extraction (`extract_answer`), in order:
  1. the content of the LAST `\\boxed{...}` / `\\fbox{...}` (brace-matched, so `\\boxed{\\frac{1}{2}}` works;
     also `\\boxed 5`);
  2. fallback: the last "answer is X" / "Answer: X" phrase (X up to the end of the line or a sentence end);
  3. fallback: the last number in the text (integer, decimal, a/b fraction, optional sign).
  No answer found -> score 0 with status "ok" (a wrong answer, not a reward failure).
Set `fallback="boxed_only"` to require the box (stricter format reward), "answer_is" to skip the last-number one.

`extraction="hf_math_verify"` is the official MGS recipe's path (its verl's reward_score/hf_math_verify.py): the text
after the last `<response>`, cut at the first stop word (`</response>`, `</s>`, `<|im_end|>`, `<|endoftext|>`); the
last `\\boxed{...}` there, else `\\boxed{<answer>}` of the fallbacks above; gold as `\\boxed{gold}` (unless boxed);
then math-verify's own `parse` of both and `verify`. (The official code runs it on the reward model's decoded input,
prompt included, so a box in the prompt can win when the response has none; we score the response only.)
`extraction="math_verify"`: math-verify's own extraction (its default LaTeX and expression configs) of the whole
response, no fallbacks.

Equivalence: `verify(parse(gold), parse(pred))` with both sides wrapped in `$...$` (plain `{1,2}` parses to
nothing otherwise), math-verify's own SIGALRM timeouts disabled, run in worker processes (their own program, not
`spawn`: they do not re-run the caller's main module) with a hard per-item timeout (see worker.py for why).
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

from .base import DEFAULT_TIMEOUT_S, FAILED, Reward, RewardInput, ScoreOutcome, register_reward

_BOX_CMDS = ("\\boxed", "\\fbox")
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces matched) or \\boxed x; None if absent/unclosed."""
    pos = max(text.rfind(c) for c in _BOX_CMDS)
    while pos >= 0:
        cmd = next(c for c in _BOX_CMDS if text.startswith(c, pos))
        i = pos + len(cmd)
        if i < len(text) and text[i] == " " and not text[i:].lstrip().startswith("{"):
            m = re.match(r"\s+([^\s$]+)", text[i:])  # "\boxed 5"
            if m:
                return m.group(1)
        j = i
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            for k in range(j, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[j + 1:k].strip()
        # unclosed or malformed: look at the previous box
        pos = max(text.rfind(c, 0, pos) for c in _BOX_CMDS)
    return None


def _strip_answer(ans: str) -> str:
    ans = ans.strip().rstrip(".").strip()
    if len(ans) >= 2 and ans[0] == ans[-1] == "$":
        ans = ans[1:-1].strip()
    return ans


def extract_answer(text: str, fallback: str = "last_number") -> tuple[str | None, str]:
    """-> (answer or None, method) with method in {"boxed", "answer_is", "last_number", "none"}."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    if fallback in ("answer_is", "last_number"):
        hits = _ANSWER_IS.findall(text)
        if hits:
            ans = re.split(r"(?<=[^\d])\.\s|\.$", hits[-1].strip())[0]  # cut at sentence end, keep "0.5"
            ans = _strip_answer(ans)
            if ans:
                return ans, "answer_is"
    if fallback == "last_number":
        nums = _NUMBER.findall(text)
        if nums:
            return nums[-1].replace(" ", ""), "last_number"
    return None, "none"


def _wrap(s: str) -> str:
    s = s.strip()
    return s if ("$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s) else f"${s}$"


def math_equal(gold: str, pred: str) -> bool:
    """math-verify equivalence with its internal (SIGALRM) timeouts disabled; call it under an external timeout."""
    from math_verify import parse, verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silence "timeout is disabled" warnings
    g = parse(_wrap(gold), parsing_timeout=None) or parse(str(gold), parsing_timeout=None)
    p = parse(_wrap(pred), parsing_timeout=None) or parse(str(pred), parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


_STOP_WORDS = ("</s>", "<|im_end|>", "<|endoftext|>", "</response>")


def hf_math_verify_target(response: str, fallback: str = "last_number") -> str:
    """The boxed prediction the official recipe verifies (see the module docstring)."""
    text = response.split("<response>")[-1]
    for sw in _STOP_WORDS:
        if sw in text:
            text = text.split(sw, 1)[0].strip()
    boxed = last_boxed(text)
    if boxed is None:
        boxed, _ = extract_answer(text, fallback)
    return f"\\boxed{{{boxed or ''}}}"


def hf_math_verify_equal(gold: str, target_boxed: str) -> bool:
    from math_verify import parse, verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_boxed = gold if "\\boxed" in gold else f"\\boxed{{{gold}}}"
    g, p = parse(gold_boxed, parsing_timeout=None), parse(target_boxed, parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


EXTRACTIONS = ("boxed", "hf_math_verify", "math_verify")


def math_score(gold: str, response: str, fallback: str = "last_number", extraction: str = "boxed") -> float:
    """The function run in the worker: 1.0 if the response's answer equals `gold`, else 0.0."""
    if extraction == "hf_math_verify":
        return 1.0 if hf_math_verify_equal(str(gold), hf_math_verify_target(response, fallback)) else 0.0
    if extraction == "math_verify":  # math-verify's own extraction (its default configs) of the whole response
        return 1.0 if hf_math_verify_equal(str(gold), response) else 0.0
    ans, _ = extract_answer(response, fallback)
    if ans is None:
        return 0.0
    return 1.0 if math_equal(str(gold), ans) else 0.0


@register_reward("math_verify", "math")
class MathReward(Reward):
    """0/1 math reward. `executor`: "process" (default; hard timeout, see worker.py) or "inline" (no timeout;
    for debugging and for callers that guarantee short inputs). The gold answer is `sample[answer_key]`."""

    name = "math_verify"
    has_accuracy = True

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, num_workers: int = 1, executor: str = "process",
                 fallback: str = "last_number", answer_key: str = "answer", max_response_chars: int = 20000,
                 extraction: str = "boxed"):
        if executor not in ("process", "inline"):
            raise ValueError(f"executor must be 'process' or 'inline', got {executor!r}")
        if extraction not in EXTRACTIONS:
            raise ValueError(f"extraction must be one of {EXTRACTIONS}, got {extraction!r}")
        self.extraction = extraction
        self.timeout_s, self.executor, self.fallback = float(timeout_s), executor, fallback
        self.answer_key, self.max_chars = answer_key, max_response_chars
        self.num_workers = num_workers
        self._runner = None

    def _args(self, item: RewardInput) -> tuple:
        if self.answer_key not in item.sample:
            raise KeyError(f"math sample has no {self.answer_key!r} field")
        # only the tail matters for the last \boxed{}; bounding the length bounds the regex/parse work
        return str(item.sample[self.answer_key]), item.response[-self.max_chars:], self.fallback, self.extraction

    def score_batch(self, items: Sequence[RewardInput]) -> list[ScoreOutcome]:
        out: list[ScoreOutcome | None] = [None] * len(items)
        todo = []
        for i, it in enumerate(items):
            try:
                todo.append((i, self._args(it)))
            except Exception as e:
                out[i] = ScoreOutcome(0.0, FAILED, f"{type(e).__name__}: {e}")
        if self.executor == "inline":
            for i, args in todo:
                try:
                    out[i] = ScoreOutcome(math_score(*args))
                except Exception as e:
                    out[i] = ScoreOutcome(0.0, FAILED, f"{type(e).__name__}: {e}")
        elif todo:
            if self._runner is None:
                from .worker import ProcessPoolRunner
                self._runner = ProcessPoolRunner("mgs_megatron.rewards.math_reward:math_score", self.num_workers)
            for (i, _), o in zip(todo, self._runner.run([a for _, a in todo], self.timeout_s)):
                out[i] = o
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
