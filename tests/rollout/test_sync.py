"""Weight sync + logprob agreement at world 1 (harness rank, one engine per architecture) and failure paths."""

from __future__ import annotations

import pytest

from mgs_megatron.testing.harness import Layout, run_distributed
from tests.rollout import models
from tests.rollout.workers import sync_check_worker

ARCHS = ["qwen2", "llama_tied", "qwen3"]
TOL = 1e-3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rollout")
    return {name: models.prepare(name, root) for name in ARCHS}


def check_agreement(res: dict, where: str, world_rollouts: int) -> None:
    assert res["before_sync"]["rollout/logprob_diff_max"] > 0.05, f"{where}: engine started with the same weights?"
    for key in ("after_sync", "after_sync2"):
        assert res[key]["rollout/logprob_tokens"] > 0, where
        assert res[key]["rollout/logprob_diff_max"] < TOL, (where, key, res[key])
    assert res["stale_after_step"]["rollout/logprob_diff_max"] > TOL, f"{where}: the optimizer step changed nothing"
    assert res["changed"], where
    assert res["reproducible"], where
    assert res["count"] == world_rollouts, where
    assert set(res["finish_reasons"]) <= {"stop", "length"}, where
    for key in ("sync1", "sync2"):
        assert res[key]["bytes"] > 0 and res[key]["buckets"] > 1 and res[key]["seconds"] > 0, where
    assert res["sync2"]["version"] == res["sync1"]["version"] + 1, where


@pytest.mark.parametrize("arch", ARCHS)
def test_sync_logprobs_world1(prepared, arch):
    engine_dir, mcore_dir = prepared[arch]
    (res,) = run_distributed(sync_check_worker, Layout(), engine_dir, mcore_dir, arch == "qwen2", timeout=400)
    check_agreement(res, arch, len(models.PROMPTS) * 2)
    if arch == "qwen2":
        assert "injected failure in bucket 2" in res["sync_failure"] and "invalid" in res["sync_failure"]
        assert "full weight sync must succeed" in res["generate_when_invalid"]
        assert res["after_recovery"]["rollout/logprob_diff_max"] < TOL
        assert "max_prompt_len=64" in res["overlong_error"]
        assert res["truncated"] == (True, 64, 1, 2)
        assert "10000" in res["bad_token_error"] or "out of vocab" in res["bad_token_error"].lower(), \
            res["bad_token_error"]
        assert "timed out" in res["timeout_error"]
        assert res["after_errors"]["rollout/logprob_diff_max"] < TOL
