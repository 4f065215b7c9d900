"""Every test here needs a CUDA GPU (one is enough): marked `gpu`, skipped elsewhere and never counted as passed.
Run them with `bash tools/gpu_check.sh` on a GPU machine."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)


from tests.rl.conftest import toy  # noqa: E402, F401  (the toy data / tokenizer / reward model fixture)
