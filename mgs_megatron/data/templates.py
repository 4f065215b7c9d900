"""Chat templates the data config can name (`data.chat_template`).

  ""       the tokenizer's own template (Instruct / chat models)
  "think"  the official MGS runs' thinking prompt for base models (RLMT's "prompted" models,
           convert_base_to_prompted_model.py): the model plans inside <think> ... </think> and answers inside
           <response> ... </response>; system messages are dropped, as in the original
  other    a Jinja template, or the path of a file holding one
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

THINK_TEMPLATE = (
    "{{- bos_token }}"
    "{{- \"A conversation between User and Assistant. Following the User's query, the Assistant first plans a "
    "response, and then provides the response. \" }}"
    "{{- \"The internal reasoning process is enclosed within <think> </think> tags and the response is enclosed "
    "within <response> </response> tags, \" }}"
    "{{- \"i.e., in the format <think> reasoning process here </think> <response> response here </response>.\\n\\n\" }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- \"User: <query>\" + message['content'] | trim + \"</query>\\n\" }}"
    "{%- elif message.role == 'assistant' %}{{- \"Assistant: \" + message['content'] | trim }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- \"Assistant:\" }}{%- endif %}"
)

CHAT_TEMPLATES = {"think": THINK_TEMPLATE}


def resolve_chat_template(spec: str) -> Optional[str]:
    """The Jinja text of a `data.chat_template` value (None: the tokenizer's own)."""
    if not spec:
        return None
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    if "{" not in spec and Path(spec).is_file():
        return Path(spec).read_text()
    if "{" not in spec:
        raise ValueError(f"chat_template {spec!r} is neither a known name ({sorted(CHAT_TEMPLATES)}), an existing "
                         f"file nor a Jinja template")
    return spec


__all__ = ["CHAT_TEMPLATES", "THINK_TEMPLATE", "resolve_chat_template"]
