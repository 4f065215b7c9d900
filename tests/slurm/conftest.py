from tests.rl.conftest import toy  # noqa: F401 - the toy data, tokenizer and reward model fixture
