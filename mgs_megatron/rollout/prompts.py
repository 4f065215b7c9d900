"""Prompts to token ids, one way for every generator (the vLLM engine, the Megatron backend, the warm-up): the chat
template, then the length policy (`rollout.prompt_truncation`)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from mgs_megatron.rollout.config import PromptTooLongError

Prompt = Union[str, Sequence[dict], Sequence[int]]  # text | chat messages | token ids


def encode_prompt(tokenizer, prompt: Prompt, chat_template: Optional[str] = None) -> list[int]:
    """Token ids of a prompt: chat messages (or a bare string, as one user message when a template is set) through
    the chat template with the generation prompt; plain text without a template as is; token ids unchanged."""
    if isinstance(prompt, str) and chat_template is None:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if len(prompt) and isinstance(prompt[0], dict):  # the template adds its own special tokens
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False,
                                             chat_template=chat_template)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [int(t) for t in prompt]


def fit_prompt(ids: list[int], max_len: int, policy: str, index: int) -> Optional[list[int]]:
    """A prompt within max_len tokens: 'error' raises naming it, 'left' keeps its last max_len tokens (where the
    question's end and the generation prompt live), 'drop' returns None (the prompt gets no samples)."""
    if len(ids) <= max_len:
        return ids
    if policy == "error":
        raise PromptTooLongError(f"prompt {index} has {len(ids)} tokens > max_prompt_len={max_len} (set "
                                 f"rollout.prompt_truncation to 'left' or 'drop')")
    return ids[-max_len:] if policy == "left" else None


__all__ = ["Prompt", "encode_prompt", "fit_prompt"]
