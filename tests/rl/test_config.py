"""Bad configs fail up front with one clear error naming the key."""
import json

import pytest

from mgs_megatron.rl.cli import main
from mgs_megatron.rl.config import ConfigError, check_paths, load_config
from tests.rl.conftest import ROOT, base_overrides

TINY = ROOT / "examples" / "tiny_cpu.yaml"


def test_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(TINY, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(TINY, ["bogus.x=1"])
    with pytest.raises(ConfigError, match="'optim.lr': expected a number"):
        load_config(TINY, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="'run.total_steps': expected an int"):
        load_config(TINY, ["run.total_steps=2.5"])
    with pytest.raises(ConfigError, match="'strategy'"):
        load_config(TINY, ["strategy=magic"])
    with pytest.raises(ConfigError, match="'mgs'.*rule"):
        load_config(TINY, ["mgs.rule=nope"])
    with pytest.raises(ConfigError, match="'mgs.kernel': 'triton' is not one of"):  # a Literal choice, key named
        load_config(TINY, ["mgs.kernel=triton"])
    cfg = load_config(TINY, ["optim.lr=1e-6", "strategy=mixed"])
    assert cfg.optim.lr == 1e-6 and cfg.strategy == "mixed"


def test_file_level_checks(tmp_path, toy):
    ov = base_overrides(toy, tmp_path / "o")
    check_paths(load_config(TINY, ov))
    with pytest.raises(ConfigError, match="model.path.*not reachable"):
        check_paths(load_config(TINY, ov + [f"model.path={tmp_path}/missing", "model.hf_config={}"]))
    with pytest.raises(ConfigError, match="'model.path' and 'model.hf_config' are both set"):
        load_config(TINY, ov + [f"model.path={tmp_path}"])
    poetry = tmp_path / "poetry.jsonl"
    poetry.write_text(json.dumps({"domain": "poetry", "prompt": "A poem."}) + "\n")
    with pytest.raises(ConfigError, match="rewards.domains.poetry.*no reward"):
        check_paths(load_config(TINY, ov + [f"data.sources=[{toy['math']},{poetry}]"]))
    nodomain = tmp_path / "nodomain.jsonl"
    nodomain.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ConfigError, match="field 'domain'"):
        check_paths(load_config(TINY, ov + [f"data.sources=[{nodomain}]"]))
    with pytest.raises(ConfigError, match="data file .* does not exist"):
        check_paths(load_config(TINY, ov + [f"data.sources=[{tmp_path}/nope.jsonl]"]))


def test_cli_reports_config_error(capsys):
    assert main([str(TINY), "optim.nope=1"]) == 2
    assert "unknown config key 'optim.nope'" in capsys.readouterr().err


def test_cli_dry_run(capsys, toy, tmp_path):
    assert main([str(TINY), "--dry-run", *base_overrides(toy, tmp_path)]) == 0
    assert "torch.distributed.run --nproc-per-node 2" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["qwen2.5-7b.yaml", "llama3.1-8b.yaml"])
def test_recipes_parse(recipe):
    cfg = load_config(ROOT / "examples" / recipe)
    assert (cfg.optim.lr, cfg.data.prompts_per_step, cfg.rollout.n, cfg.rollout.temperature) == (1e-6, 64, 8, 0.7)
    assert (cfg.algo.kl_coef, cfg.algo.kl_type, cfg.algo.entropy_coef, cfg.algo.clip_low) == \
        (0.001, "low_var_kl", 0.001, 0.2)
    assert cfg.rollout.max_response_len == 4096 and cfg.strategy == "mgs"
