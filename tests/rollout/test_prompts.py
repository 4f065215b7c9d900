"""Prompt rendering and the length policy, shared by every generator: the official thinking template renders the
text the official runs feed their base models, and over-long prompts are cut from the left, dropped or refused."""

import pytest

from mgs_megatron.data.templates import resolve_chat_template
from mgs_megatron.rollout.config import PromptTooLongError
from mgs_megatron.rollout.prompts import encode_prompt, fit_prompt


def test_think_template_renders_the_official_prompt(tmp_path):
    from transformers import AutoTokenizer

    from mgs_megatron.data.toy import build_toy_tokenizer

    build_toy_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = tok.apply_chat_template([{"role": "system", "content": "dropped"},
                                    {"role": "user", "content": "  What is 2+2? "}], add_generation_prompt=True,
                                   tokenize=False, chat_template=resolve_chat_template("think"))
    # RLMT's convert_base_to_prompted_model.py, rendered (the toy tokenizer has no bos token)
    assert text == ("A conversation between User and Assistant. Following the User's query, the Assistant first "
                    "plans a response, and then provides the response. The internal reasoning process is enclosed "
                    "within <think> </think> tags and the response is enclosed within <response> </response> tags, "
                    "i.e., in the format <think> reasoning process here </think> <response> response here "
                    "</response>.\n\nUser: <query>What is 2+2?</query>\nAssistant:")
    ids = encode_prompt(tok, "What is 2+2?", resolve_chat_template("think"))
    assert tok.decode(ids).endswith("<query>What is 2+2?</query>\nAssistant:")
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}!")
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] }}!"
    with pytest.raises(ValueError, match="neither a known name"):
        resolve_chat_template("thinking")


def test_length_policies():
    ids = list(range(10))
    assert fit_prompt(ids, 10, "error", 0) == ids
    assert fit_prompt(ids, 4, "left", 0) == [6, 7, 8, 9]
    assert fit_prompt(ids, 4, "drop", 0) is None
    with pytest.raises(PromptTooLongError, match="prompt 3 has 10 tokens > max_prompt_len=4"):
        fit_prompt(ids, 4, "error", 3)
