"""Issue 16, items 5-8: data and settings that passed the check and failed (or trained on nothing) later."""
import json
import logging

import pytest

from mgs_megatron.data import DataValidationError, load_sources
from mgs_megatron.rl.config import ConfigError, check_paths, load_config
from mgs_megatron.rollout.config import PromptTooLongError, Rollout, RolloutConfig
from tests.reliability.conftest import ROOT, base_overrides

TINY = ROOT / "examples" / "tiny_cpu.yaml"
IF_OK = {"domain": "if", "prompt": "Say hi. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ 5
@pytest.mark.parametrize("ids, kwargs, field, why", [
    (["punctuation:no_semicolons_ever"], [{}], "instruction_id_list", "unknown IFEval instruction id "
                                                                      "'punctuation:no_semicolons_ever'"),
    (["punctuation:no_comma", "length_constraints:number_words"], [{}, {"num_words": 5}], "kwargs",
     "item 1: length_constraints:number_words: missing kwargs ['relation']"),
    (["punctuation:no_comma"], [{"num_words": 5}], "kwargs", "item 0: punctuation:no_comma: unexpected kwargs "
                                                             "['num_words']"),
    (["length_constraints:number_words"], [{"relation": "roughly", "num_words": 5}], "kwargs", "roughly"),
])
def test_if_rows_are_checked_against_the_checkers_at_load(tmp_path, toy, ids, kwargs, field, why):
    f = _jsonl(tmp_path / "if.jsonl", [IF_OK, IF_OK, dict(IF_OK, instruction_id_list=ids, kwargs=kwargs)])
    with pytest.raises(DataValidationError) as e:
        load_sources([str(f)])
    assert (e.value.file, e.value.row, e.value.field) == (str(f), 3, field) and why in str(e.value)
    with pytest.raises(ConfigError, match=f"'data.sources': {f}: row 3: field '{field}'"):
        check_paths(load_config(TINY, base_overrides(toy, tmp_path / "o") + [f"data.sources=[{toy['math']},{f}]"]))


def test_the_toy_if_rows_pass(toy):
    assert len(load_sources([str(toy["if"])])["if"]) > 0


# ------------------------------------------------------------------------------------------------ 6
def test_empty_file_as_the_only_source_is_an_error_naming_it(tmp_path, toy):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"'data.sources': {empty}: no prompt rows"):
        check_paths(load_config(TINY, base_overrides(toy, tmp_path / "o") + [f"data.sources=[{empty}]"]))


def test_empty_file_among_others_is_a_warning_naming_it(tmp_path, toy, caplog):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with caplog.at_level(logging.WARNING, logger="mgs_megatron.data"):
        data = check_paths(load_config(TINY, base_overrides(toy, tmp_path / "o")
                                       + [f"data.sources=[{toy['math']},{empty}]"]))
    assert list(data) == ["math"]
    assert any(str(empty) in r.getMessage() and "no prompt rows" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ 7
def _megatron_backend(toy, **cfg):
    from transformers import AutoTokenizer

    from mgs_megatron.rollout.backends import MegatronBackend

    return MegatronBackend(RolloutConfig(**cfg), None, AutoTokenizer.from_pretrained(toy["tokenizer"]), 512, seed=0)


def test_megatron_backend_counts_truncated_prompts_and_honours_prompt_truncation(toy):
    from mgs_megatron.rl.metrics import rollout_metrics

    long = [{"role": "user", "content": "What is 1+2? " * 20}]
    full, _ = _megatron_backend(toy, max_prompt_len=4096).encode(long)
    ids, cut = _megatron_backend(toy, max_prompt_len=16).encode(long)
    assert cut and ids == full[-16:]
    assert _megatron_backend(toy, max_prompt_len=4096).encode(long)[1] is False
    assert _megatron_backend(toy, max_prompt_len=16, prompt_truncation="drop").encode(long) == (None, False)
    with pytest.raises(PromptTooLongError, match="max_prompt_len=16"):
        _megatron_backend(toy, max_prompt_len=16, prompt_truncation="error").encode(long)
    rollouts = [Rollout([1], [2], [0.0], "x", "stop", g, k, prompt_truncated=g < 2) for g in range(3) for k in range(4)]
    assert rollout_metrics(rollouts, 5) == {"rollout/truncated_prompts": 2.0,  # prompts, not samples
                                            "rollout/dropped_prompts": 2.0}  # prompts 3 and 4 got no samples


# ------------------------------------------------------------------------------------------------ 8
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_one_sample_per_prompt_is_rejected_for_group_relative_advantages(estimator):
    with pytest.raises(ConfigError, match="'rollout.n': 1 sample per prompt.*nothing would train"):
        load_config(TINY, ["rollout.n=1", f"algo.adv_estimator={estimator}"])
    assert load_config(TINY, ["rollout.n=2"]).rollout.n == 2
