"""Megatron logits == HF logits at TP1 / TP2 / PP2 / TP2xPP2, streaming export bit-exact, save at TP2 -> load
at other layouts. One spawn per layout: each worker checks every model variant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgs_megatron.testing.harness import Layout, run_distributed
from tests.convert import models

LAYOUTS = [Layout(tp=2), Layout(tp=1), Layout(pp=2), Layout(tp=2, pp=2)]  # TP2 first: it writes the live save
SAVED_VARIANT = "qwen2"


def _build(mcore_dir: str):
    from megatron.core import parallel_state as ps

    from mgs_megatron.convert import read_model_config
    from mgs_megatron.megatron.model import ParallelConfig, build_gpt_model

    cfg = read_model_config(mcore_dir)
    torch.manual_seed(123)  # a different init than the checkpoint: loading must overwrite everything
    par = ParallelConfig(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    return cfg, [build_gpt_model(cfg, par)]


def _hf_reference(hf_dir: Path) -> None:
    """HF logits computed in the parent process, apart from the ranks and their CPU backend."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.save(hf(models.input_ids()).logits, hf_dir / "ref_logits.pt")


def _hf_state_dict(hf_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(hf_dir) / "model.safetensors"))


def layout_worker(dirs: dict, save_to: str | None, load_saved: str | None) -> dict:
    import torch.distributed as dist

    from mgs_megatron.megatron.forward import megatron_logits
    from mgs_megatron.megatron.stream import iter_hf_weights
    from mgs_megatron.weights import load_weights, save_weights

    ids = models.input_ids()
    out = {}
    for name, (hf_dir, mcore_dir) in dirs.items():
        ref_logits = torch.load(Path(hf_dir) / "ref_logits.pt")
        ref_sd = _hf_state_dict(hf_dir)
        cfg, chunks = _build(mcore_dir)
        load_weights(chunks, mcore_dir)
        logits = megatron_logits(chunks, ids, cfg.vocab_size)
        res = {"logit_diff": None if logits is None else (logits - ref_logits).abs().max().item()}
        # streaming export, all ranks receive; small groups so several are produced
        exported, bad_groups, ngroups = {}, [], 0
        for group in iter_hf_weights(chunks, cfg, max_bytes=64 << 10):
            ngroups += 1
            names = [n for n, _ in group]
            for n in names:
                if any(n.endswith(s) for s in ("q_proj.weight", "gate_proj.weight")):
                    partner = n.replace("q_proj", "v_proj").replace("gate_proj", "up_proj")
                    if partner not in names:
                        bad_groups.append(n)
            exported.update(group)
        res["groups"] = ngroups
        res["split_fused_groups"] = bad_groups
        res["export_names_equal"] = sorted(exported) == sorted(ref_sd)
        res["export_bit_exact"] = res["export_names_equal"] and all(torch.equal(exported[k], ref_sd[k]) for k in ref_sd)
        rank0 = [g for g in iter_hf_weights(chunks, cfg, max_bytes=64 << 10, all_ranks=False) if g]
        got = dict(kv for g in rank0 for kv in g)
        res["rank0_only_count"] = len(got)
        res["rank0_only_bit_exact"] = (dist.get_rank() != 0) or all(torch.equal(got[k], ref_sd[k]) for k in ref_sd)
        if save_to is not None and name == SAVED_VARIANT:
            save_weights(chunks, cfg, save_to, hf_side_dir=Path(mcore_dir) / "hf")
        if load_saved is not None and name == SAVED_VARIANT:
            _, chunks2 = _build(load_saved)
            load_weights(chunks2, load_saved)
            l2 = megatron_logits(chunks2, ids, cfg.vocab_size)
            res["saved_reload_diff"] = None if l2 is None else (l2 - ref_logits).abs().max().item()
        out[name] = res
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    from mgs_megatron.convert import hf_to_mcore_checkpoint

    root = tmp_path_factory.mktemp("layouts")
    dirs = {}
    for name, hf_dir in models.save_all(root).items():
        _hf_reference(hf_dir)
        mc = root / f"{name}-mcore"
        hf_to_mcore_checkpoint(hf_dir, mc, progress=False)
        dirs[name] = (str(hf_dir), str(mc))
    return {"dirs": dirs, "saved": str(root / "saved-at-tp2"), "results": {}}


def _run(converted, layout: Layout) -> list[dict]:
    key = str(layout)
    if key not in converted["results"]:
        is_tp2 = layout == Layout(tp=2)
        if not is_tp2 and str(Layout(tp=2)) not in converted["results"]:
            _run(converted, Layout(tp=2))
        converted["results"][key] = run_distributed(
            layout_worker, layout, converted["dirs"], converted["saved"] if is_tp2 else None,
            None if is_tp2 else converted["saved"], timeout=300)
    return converted["results"][key]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_layout(converted, layout):
    per_rank = _run(converted, layout)
    last_stage = [r for r in per_rank if next(iter(r.values()))["logit_diff"] is not None]
    assert len(last_stage) == layout.tp
    for rank, res in enumerate(per_rank):
        for name, r in res.items():
            where = f"{name} at {layout} rank {rank}"
            if r["logit_diff"] is not None:
                assert r["logit_diff"] < 1e-4, where
            assert r["split_fused_groups"] == [], where
            assert r["groups"] > 1, where
            assert r["export_names_equal"] and r["export_bit_exact"], where
            assert r["rank0_only_bit_exact"], where
            assert (r["rank0_only_count"] > 0) == (rank == 0), where
            if "saved_reload_diff" in r and r["saved_reload_diff"] is not None:
                assert r["saved_reload_diff"] < 1e-4, where
    if layout != Layout(tp=2):
        assert any("saved_reload_diff" in res[SAVED_VARIANT] for res in per_rank)
        assert (Path(converted["saved"]) / "hf" / "config.json").exists()
