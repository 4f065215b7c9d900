"""Fixtures shared with tests/rl: the toy data assets (tokenizer, prompts, reward model)."""

from tests.rl.conftest import toy  # noqa: F401
