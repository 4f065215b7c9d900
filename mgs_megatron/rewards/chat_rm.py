"""Chat reward: a sequence-classification reward model (one logit per sequence) from a local path.

Text = the tokenizer's chat template applied to prompt messages + the assistant response. Batches are padded
on the RIGHT, so real tokens sit at positions 0..len-1 exactly as in unbatched scoring (causal attention never
sees the pads); the score is read at the last non-pad token by the model's own pooling, which locates it from
`config.pad_token_id`. If the tokenizer has no pad token we add none: eos is reused as pad, and both the
tokenizer and `model.config.pad_token_id` are set so the pooling index is right. (Caveat of HF's pooling: a
real trailing token equal to pad_token_id is treated as padding; it is so in batched and unbatched alike.)

`response_span` picks the scored part of the response (rewards/spans.py; "response_tag": the official recipe's text
between `<response>` and `</response>`). An input longer than `max_length` tokens keeps its end (the response's end
and the template's closing tokens) and is counted in `truncated` (warned once): never silently.

Placement: one copy per node, not per rank (`placement = "node"`): the trainer sends this reward's items to the
node's LOCAL_RANK 0 (rl/scoring.py), so `device: cuda` means that rank's GPU (give it the memory: lower
rollout.gpu_memory_utilization there, or `device: cpu`).

Backends: "hf" (transformers, CPU or one GPU). "vllm" is a documented hook for GPU runs (vLLM's pooling
runner, `LLM(model=path, runner="pooling")` + `llm.encode`/`classify`): not implemented here, and vLLM is
never imported at module import time.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from .base import Reward, RewardInput, ScoreOutcome, register_reward
from .spans import check_span, response_span

logger = logging.getLogger(__name__)


def to_messages(prompt: Any, response: str) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return msgs + [{"role": "assistant", "content": response}]


@register_reward("reward_model", "chat")
class RewardModelReward(Reward):
    name = "reward_model"
    placement = "node"  # one copy per node: the trainer scores its items on LOCAL_RANK 0 only (rl/scoring.py)

    def __init__(self, model_path: str, backend: str = "hf", device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 8, max_length: int = 2048, scale: float = 1.0, shift: float = 0.0,
                 squash: str | None = None, offload: bool = False, response_span: str = "all"):
        """`score = squash(scale * logit + shift)`; squash in {None, "sigmoid"}. offload: keep the model in CPU
        memory and move it to `device` only while it scores (in the trainer that is while vLLM sleeps and Megatron
        is not training, so it takes no GPU memory from either)."""
        self.span = check_span(response_span)
        self.truncated = 0
        if backend == "vllm":
            raise NotImplementedError(
                "vLLM pooling backend for the chat reward model is a GPU hook not implemented yet: build "
                "vllm.LLM(model=model_path, runner='pooling') lazily here and score with llm.classify(texts)")
        if backend != "hf":
            raise ValueError(f"unknown reward-model backend {backend!r}")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.tok.padding_side = "right"
        self.tok.truncation_side = "left"  # over-long texts keep the response end
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=getattr(torch, dtype)).to("cpu" if offload else device).eval()
        if self.model.config.num_labels != 1:
            logger.warning("reward model has %d labels; using logit 0", self.model.config.num_labels)
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.device, self.batch_size, self.max_length, self.offload = device, int(batch_size), int(max_length), offload
        self.scale, self.shift, self.squash = float(scale), float(shift), squash

    def texts(self, items: Sequence[RewardInput]) -> list[str]:
        return [self.tok.apply_chat_template(to_messages(it.prompt, response_span(it.response, self.span)),
                                             tokenize=False) for it in items]

    def logits(self, texts: Sequence[str]) -> list[float]:
        if self.offload:
            self.model.to(self.device)
            try:
                return self._logits(texts)
            finally:
                self.model.to("cpu")
        return self._logits(texts)

    def _logits(self, texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            self._count_truncated(texts[i:i + self.batch_size])
            # the template already holds the special tokens: do not add bos/eos again
            enc = self.tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                           max_length=self.max_length, add_special_tokens=False, return_tensors="pt")
            with self.torch.inference_mode():
                logits = self.model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device)).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        return out

    def _count_truncated(self, texts: Sequence[str]) -> None:
        lengths = [len(ids) for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]]
        cut = sum(n > self.max_length for n in lengths)
        if cut and not self.truncated:
            logger.warning("reward model: %d input(s) longer than max_length=%d tokens (longest %d) keep their last "
                           "%d tokens; counted in RewardModelReward.truncated", cut, self.max_length, max(lengths),
                           self.max_length)
        self.truncated += cut

    def score_batch(self, items: Sequence[RewardInput]) -> list[ScoreOutcome]:
        raw = self.logits(self.texts(items))
        scores = [self.scale * x + self.shift for x in raw]
        if self.squash == "sigmoid":
            import math
            scores = [1.0 / (1.0 + math.exp(-s)) for s in scores]
        return [ScoreOutcome(s) for s in scores]

    def close(self) -> None:
        self.model = None
