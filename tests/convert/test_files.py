"""File conversion: HF dir -> mcore -> HF bit-exact (API and CLI), side files, atomic writes on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mgs_megatron.convert import hf_to_mcore_checkpoint, mcore_to_hf_checkpoint
from mgs_megatron.convert.io import SafetensorsDir
from mgs_megatron.errors import ConfigError, ConversionError
from tests.convert import models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return models.save_all(tmp_path_factory.mktemp("hf"))


def _tensors(d: Path) -> dict:
    src = SafetensorsDir(d)
    return {k: src.get(k) for k in src.keys()}


def _assert_same(a: Path, b: Path):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("name", list(models.specs()))
def test_api_round_trip_bit_exact(hf_dirs, tmp_path, name):
    hf_to_mcore_checkpoint(hf_dirs[name], tmp_path / "mc", progress=False, max_shard_bytes=200_000)
    assert len(list((tmp_path / "mc").glob("model-*.safetensors"))) > 1  # sharded, with an index
    mcore_to_hf_checkpoint(tmp_path / "mc", tmp_path / "hf", progress=False, max_shard_bytes=300_000)
    _assert_same(hf_dirs[name], tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == \
        json.loads((hf_dirs[name] / "config.json").read_text())
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["marker"] == name
    assert sorted(os.listdir(tmp_path)) == ["hf", "mc"]  # no temp dirs left behind


def test_cli_round_trip_bit_exact(hf_dirs, tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    src = hf_dirs["llama_tied"]
    r = subprocess.run(tool + ["hf-to-mcore", str(src), str(tmp_path / "mc"), "--quiet"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(tool + ["mcore-to-hf", str(tmp_path / "mc"), str(tmp_path / "hf"), "--check", "--pp", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "check: max |HF - Megatron|" in r.stdout
    _assert_same(src, tmp_path / "hf")
    r = subprocess.run(tool + ["mcore-to-hf", str(tmp_path / "mc"), str(tmp_path / "hf")], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode != 0 and "already exists" in r.stderr


def _corrupt(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"), r"missing.*model\.layers\.1\.mlp\.down_proj\.weight"),
    (lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}), r"unexpected.*model\.layers\.0\.extra"),
    (lambda sd: sd.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(448, 447)}),
     r"model\.layers\.1\.self_attn\.o_proj\.weight.*\(448, 447\)"),
])
def test_bad_input_writes_nothing(hf_dirs, tmp_path, edit, match):
    bad = _corrupt(hf_dirs["qwen2"], tmp_path / "bad", edit)
    with pytest.raises(ConversionError, match=match):
        hf_to_mcore_checkpoint(bad, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_unknown_architecture_writes_nothing(hf_dirs, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dirs["qwen3"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="gemma", architectures=["GemmaForCausalLM"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type='gemma'"):
        hf_to_mcore_checkpoint(bad, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def test_failure_mid_write_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    from mgs_megatron.convert import canonical

    calls = {"n": 0}
    real = canonical.hf_to_mcore

    def failing(tm, get, cfg):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(tm, get, cfg)

    monkeypatch.setattr(canonical, "hf_to_mcore", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        hf_to_mcore_checkpoint(hf_dirs["qwen2"], tmp_path / "out", progress=False, max_shard_bytes=100_000)
    assert os.listdir(tmp_path) == []
