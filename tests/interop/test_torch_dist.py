"""Megatron-LM torch_dist checkpoints without megatron.training (megatron-core 0.16.1 and 0.19.2): the file-level
converter (one process, no model) and the live save / load at different layouts, against Hugging Face's logits
and tensors; atomic writes (an interrupted save leaves the previous checkpoint as the one that loads)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgs_megatron.testing.harness import Layout, run_distributed
from tests.convert import models

VARIANTS = ("qwen2", "llama_tied", "qwen3")  # qkv bias; tied + llama3 rope scaling; q/k norm
TOL = 1e-5


def _hf(tmp_path: Path) -> dict:
    out = {}
    for name in VARIANTS:
        model = models.build(name)
        model.save_pretrained(tmp_path / "hf" / name)
        with torch.no_grad():
            torch.save(model(models.input_ids()).logits.float(), tmp_path / "hf" / name / "ref.pt")
        out[name] = tmp_path / "hf" / name
    return out


def load_and_save(roots: dict, save_root) -> dict:
    """Load each checkpoint at this layout, return the logits; optionally save it live as torch_dist."""
    from megatron.core import parallel_state as ps

    from mgs_megatron.convert.torch_dist_io import TorchDistReader
    from mgs_megatron.megatron.forward import megatron_logits
    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model
    from mgs_megatron.weights import load_weights
    from mgs_megatron.weights.torch_dist import save_torch_dist

    out = {}
    for name, root in roots.items():
        cfg = TorchDistReader(root).model_config()
        torch.manual_seed(99)  # other weights than the checkpoint's: the load must overwrite them all
        chunks = [build_gpt_model(cfg, ParallelConfig(ps.get_tensor_model_parallel_world_size(),
                                                      ps.get_pipeline_model_parallel_world_size()))]
        assert load_weights(chunks, root) == cfg
        out[name] = megatron_logits(chunks, models.input_ids(), cfg.vocab_size)
        if save_root is not None:
            save_torch_dist(chunks, cfg, Path(save_root) / name, iteration=11,
                            hf_config=TorchDistReader(root).args().mgs_hf_config)
    return out


def _max_diff(results: list, ref: dict) -> dict:
    got = next(r for r in results if all(v is not None for v in r.values()))
    return {name: (got[name] - ref[name]).abs().max().item() for name in ref}


def test_file_converter_and_live_save_at_other_layouts(tmp_path):
    """HF -> torch_dist (file level, vocab padded as Megatron-LM pads it at TP2) -> our model at TP2 -> live save
    -> our model at PP2 -> torch_dist -> HF (file level): logits equal HF's at every stop, tensors bit-exact."""
    from safetensors.torch import load_file

    from mgs_megatron.convert.torch_dist_convert import hf_to_torch_dist, torch_dist_to_hf

    hf = _hf(tmp_path)
    ref = {n: torch.load(d / "ref.pt") for n, d in hf.items()}
    files = {}
    for name, d in hf.items():
        hf_to_torch_dist(d, tmp_path / "files" / name, iteration=2, tp=2)
        files[name] = str(tmp_path / "files" / name)
    # as Megatron-LM on megatron-core 0.19 writes it: the common state only inside the .distcp files (0.16 loads it)
    (tmp_path / "files" / "qwen2" / "iter_0000002" / "common.pt").unlink()
    diffs = _max_diff(run_distributed(load_and_save, Layout(tp=2), files, str(tmp_path / "live"), timeout=300), ref)
    assert max(diffs.values()) <= TOL, diffs
    live = {n: str(tmp_path / "live" / n) for n in hf}
    diffs = _max_diff(run_distributed(load_and_save, Layout(pp=2), live, None, timeout=300), ref)
    assert max(diffs.values()) <= TOL, diffs
    for name, d in hf.items():
        torch_dist_to_hf(tmp_path / "live" / name, tmp_path / "back" / name)
        a, b = load_file(str(d / "model.safetensors")), load_file(str(tmp_path / "back" / name /
                                                                      "model-00001-of-00001.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
        assert (tmp_path / "back" / name / "config.json").is_file()


_KILL_MID_WRITE = """
import os, signal, sys
from mgs_megatron.convert import torch_dist_io
orig = torch_dist_io._write_planner
def planner(chunks, objects):
    p = orig(chunks, objects)
    resolve, n = p.resolve_data, [0]
    def resolve_then_die(item):
        n[0] += 1
        if n[0] == 5:  # some data written, no metadata yet: the job is killed here
            os.kill(os.getpid(), signal.SIGKILL)
        return resolve(item)
    p.resolve_data = resolve_then_die
    return p
torch_dist_io._write_planner = planner
from mgs_megatron.convert.torch_dist_convert import hf_to_torch_dist
hf_to_torch_dist(sys.argv[1], sys.argv[2], iteration=2)
"""


def test_killed_save_leaves_the_previous_checkpoint(tmp_path):
    from mgs_megatron.convert.torch_dist import TRACKER, resolve_iteration
    from mgs_megatron.convert.torch_dist_convert import hf_to_torch_dist
    from mgs_megatron.convert.torch_dist_io import TorchDistReader
    from mgs_megatron.errors import ConversionError

    hf = models.build("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    root = tmp_path / "ckpt"
    hf_to_torch_dist(tmp_path / "hf", root, iteration=1)
    before = TorchDistReader(root).get("decoder.layers.mlp.linear_fc1.weight")
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, str(tmp_path / "hf"), str(root)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert any(p.name.startswith(".iter_0000002.tmp") for p in root.iterdir())  # the half-written one
    assert not (root / "iter_0000002").exists() and (root / TRACKER).read_text() == "1"
    reader = TorchDistReader(root)
    assert reader.path.name == "iter_0000001"
    assert torch.equal(reader.get("decoder.layers.mlp.linear_fc1.weight"), before)
    # a tracker that names a directory without metadata.json (another tool's interrupted save) is refused
    (root / "iter_0000003").mkdir()
    (root / TRACKER).write_text("3")
    with pytest.raises(ConversionError, match="iter_0000003.*did not finish"):
        resolve_iteration(root)


def test_foreign_checkpoint_needs_the_hf_config(tmp_path):
    """A torch_dist checkpoint without our model config (Megatron-LM's own) names the option that fixes it."""
    from mgs_megatron.convert.torch_dist import COMMON_KEY
    from mgs_megatron.convert.torch_dist_convert import checkpoint_model_config, hf_to_torch_dist
    from mgs_megatron.convert.torch_dist_io import TorchDistReader
    from mgs_megatron.errors import ConversionError

    models.build("qwen3").save_pretrained(tmp_path / "hf")
    hf_to_torch_dist(tmp_path / "hf", tmp_path / "ckpt", iteration=4)
    reader = TorchDistReader(tmp_path / "ckpt")
    assert COMMON_KEY in reader and reader.common()["iteration"] == 4
    reader._common = {"args": None}  # as if Megatron-LM had written it
    with pytest.raises(ConversionError, match="--hf-config"):
        checkpoint_model_config(reader)
    cfg, hf_config = checkpoint_model_config(reader, tmp_path / "hf")
    assert cfg.qk_norm and hf_config["model_type"] == "qwen3"


def test_convert_checkpoint_cli_both_ways(tmp_path):
    """tools/convert_checkpoint.py hf-to-torch-dist / torch-dist-to-hf: the HF tensors come back bit-exact."""
    from mgs_megatron.convert import SafetensorsDir
    from mgs_megatron.convert.torch_dist import TRACKER

    models.build("qwen3").save_pretrained(tmp_path / "hf")
    tool = [sys.executable, str(Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py")]
    for args in (["hf-to-torch-dist", tmp_path / "hf", tmp_path / "mlm", "--iteration", "9", "--vocab-tp", "4"],
                 ["torch-dist-to-hf", tmp_path / "mlm", tmp_path / "back", "--quiet"]):
        proc = subprocess.run(tool + [str(a) for a in args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "mlm" / TRACKER).read_text() == "9"
    a, b = SafetensorsDir(tmp_path / "hf"), SafetensorsDir(tmp_path / "back")
    assert sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
