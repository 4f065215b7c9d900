"""The package's shape, checked: imports point one way, no god files, a trainer step that reads as phases, every
config key documented (and the README's reference up to date), registries that refuse a name twice."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mgs_megatron"
MAX_LINES = 400


def _package(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved inside mgs_megatron)."""
    tree = ast.parse(path.read_text())
    here = ["mgs_megatron", *path.relative_to(PKG).with_suffix("").parts]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def _graph() -> dict[Path, set[str]]:
    return {p: _imports(p) for p in PKG.rglob("*.py")}


def _ours(mods: set[str]) -> set[str]:
    """The mgs_megatron packages (first level) among imported modules."""
    return {m.split(".")[1] for m in mods if m.startswith("mgs_megatron.") and m.count(".") >= 1}


def test_surgery_imports_only_torch_and_the_standard_library():
    for path, mods in _graph().items():
        if _package(path) != "surgery":
            continue
        foreign = {m for m in mods if not m.startswith("mgs_megatron.surgery") and m.split(".")[0] != "torch"
                   and m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}
        assert not foreign, f"{path.relative_to(ROOT)} imports {sorted(foreign)}"


def test_models_import_only_torch_and_errors():
    for path, mods in _graph().items():
        if _package(path) == "models":
            assert _ours(mods) <= {"models", "errors"}, f"{path.relative_to(ROOT)} imports {_ours(mods)}"


def test_convert_and_megatron_do_not_import_each_other():
    for path, mods in _graph().items():
        pkg = _package(path)
        if pkg in ("convert", "megatron"):
            other = "megatron" if pkg == "convert" else "convert"
            assert other not in _ours(mods), f"{path.relative_to(ROOT)} imports mgs_megatron.{other}"


def test_nothing_below_rl_imports_rl():
    above = {"rl", "integrations"}  # rl uses everything; adapters may use rl's pieces
    for path, mods in _graph().items():
        if _package(path) not in above:
            assert "rl" not in _ours(mods), f"{path.relative_to(ROOT)} imports mgs_megatron.rl"


def test_no_file_over_the_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    long = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_train_step_reads_as_phases():
    from mgs_megatron.rl.trainer import Trainer

    lines = inspect.getsource(Trainer.train_step).splitlines()
    assert len(lines) <= 40, f"Trainer.train_step has {len(lines)} lines"
    for phase in ("generate", "score", "advantages", "batches", "logprobs", "update", "sync"):
        assert f'timer("{phase}")' in "\n".join(lines), phase


def test_every_config_key_is_documented_and_the_readme_reference_is_current():
    from mgs_megatron.config import reference, undocumented
    from mgs_megatron.rl.config import TrainConfig

    assert undocumented(TrainConfig) == []
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
    assert begin in readme and end in readme, "README.md has no generated configuration reference"
    current = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    generated = "```yaml\n" + "\n".join(reference(TrainConfig)) + "\n```"
    assert current == generated, "README's configuration reference is stale: run python tools/config_reference.py"


@pytest.mark.parametrize("register, table", [
    ("mgs_megatron.surgery:register_rule", "mgs_megatron.surgery:RULES"),
    ("mgs_megatron.rl.algos:register_advantage", "mgs_megatron.rl.algos:ADVANTAGE_ESTIMATORS"),
    ("mgs_megatron.rl.algos:register_policy_loss", "mgs_megatron.rl.algos:POLICY_LOSSES"),
    ("mgs_megatron.rl.algos:register_kl", "mgs_megatron.rl.algos:KL_ESTIMATORS"),
    ("mgs_megatron.rewards:register_reward", "mgs_megatron.rewards:REWARD_REGISTRY"),
])
def test_registries_refuse_a_name_twice(register, table):
    import importlib

    def obj(path):
        mod, name = path.split(":")
        return getattr(importlib.import_module(mod), name)

    reg, entries = obj(register), obj(table)

    def add():
        return reg("test-duplicate", type("R", (), {})) if register.endswith("register_rule") else \
            reg("test-duplicate")(lambda *a, **k: None)

    try:
        add()
        with pytest.raises(ValueError, match="already registered"):
            add()
    finally:
        entries.pop("test-duplicate", None)


def test_architecture_registry_refuses_duplicates():
    from mgs_megatron.models import ARCHITECTURES, register_architecture
    from mgs_megatron.models.registry import Architecture

    with pytest.raises(ValueError, match="already registered"):
        register_architecture(ARCHITECTURES["llama"])
    with pytest.raises(ValueError, match="already belong to 'llama'"):
        register_architecture(Architecture("llama2", ("llama",), (), lambda hf: None, lambda c, i: []))
