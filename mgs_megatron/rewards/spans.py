"""The part of a response a reward scores (`response_span`), one definition for every reward.

With the thinking template (data.chat_template=think) a response reads `<think> ... </think> <response> ...
</response>`; the official recipe scores only the response part:
  "all"           the whole response;
  "response_tag"  the text after the first `<response>` up to the next `</response>` (whitespace stripped); with no
                  `<response>` the whole response, thinking included (the official non-strict behaviour); with no
                  `</response>` (cut off at max_response_len) everything after `<response>`.
"""

from __future__ import annotations

from typing import Literal

ResponseSpan = Literal["all", "response_tag"]
SPANS = ("all", "response_tag")
OPEN_TAG, CLOSE_TAG = "<response>", "</response>"


def check_span(mode: str) -> str:
    if mode not in SPANS:
        raise ValueError(f"response_span must be one of {SPANS}, got {mode!r}")
    return mode


def response_span(text: str, mode: str = "all") -> str:
    """The scored part of `text` (see the module docstring)."""
    if check_span(mode) == "all" or OPEN_TAG not in text:
        return text
    text = text[text.find(OPEN_TAG) + len(OPEN_TAG):].lstrip()
    end = text.find(CLOSE_TAG)
    return text[:end].rstrip() if end >= 0 else text


__all__ = ["CLOSE_TAG", "OPEN_TAG", "SPANS", "ResponseSpan", "check_span", "response_span"]
