"""Typed configuration trees: dataclasses built from YAML / dicts and dotted overrides, every key and type checked.

    cfg = build_config(TrainConfig, yaml.safe_load(text), ["optim.lr=2e-6", "strategy=mixed"])

Field types drive the checks (bool, int, float, str, Literal[...] choices, Optional[...], list[...], tuple[...],
dict[str, ...] whose values may be dataclasses, nested dataclasses); an unknown key, a missing required key, a value
of the wrong type or a choice not offered raises one `ConfigError` naming the dotted key. A component's own
`__post_init__` checks ranges and registry names; its ValueError becomes a ConfigError prefixed with its section.

Every field is documented by the string literal under it (Megatron-Core's attribute docstrings): `field_docs(cls)`
reads them and `reference(cls)` renders the YAML reference that the README carries.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import textwrap
import typing
from typing import Any, Literal, Sequence

import yaml

from mgs_megatron.errors import ConfigError

_MISSING = dataclasses.MISSING


# ------------------------------------------------------------------------------------------------ values
def _convert(key: str, value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _convert(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} is not "
                          + " or ".join(_type_name(a) for a in options))
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an int, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r} ({type(value).__name__})")
        return value
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if (tp is tuple or origin is tuple) else items
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {k: _convert(f"{key}.{k}", v, item) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, key)
    return value


def build(cls, data: Any, prefix: str = ""):
    """An instance of dataclass `cls` from a mapping, every key and type checked (ConfigError names the key)."""
    where = prefix or "<root>"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}

    def dotted(k: str) -> str:
        return f"{prefix}.{k}" if prefix else k

    for k in data:
        if k not in fields:
            raise ConfigError(f"unknown config key '{dotted(k)}' (known in '{where}': {sorted(fields)})")
    for name, f in fields.items():
        if name not in data and f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"config key '{dotted(name)}' is required")
    kwargs = {k: _convert(dotted(k), v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(("config key", "unknown config key")) or not prefix
                          else f"config key '{prefix}': {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key '{where}': {e}") from None


def to_tree(cfg) -> Any:
    """Plain data (dicts, lists, scalars) of a config: what `build` reads back."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_tree(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_tree(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_tree(v) for k, v in cfg.items()}
    return cfg


# ------------------------------------------------------------------------------------------------ overrides
def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """["a.b=1", "c=[x, y]"] -> [("a.b", 1), ("c", ["x", "y"])] (values are YAML)."""
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key.path=value")
        k, v = o.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v.strip() else ""))
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is not a mapping")
    node[parts[-1]] = value


def build_config(cls, tree: dict | None, overrides: Sequence[str] = ()):
    tree = copy.deepcopy(dict(tree or {}))
    for k, v in parse_overrides(list(overrides)):
        set_dotted(tree, k, v)
    return build(cls, tree)


# ------------------------------------------------------------------------------------------------ documentation
@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field: the string literal written under it} for a dataclass (inherited fields included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union:
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        return names + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[1])}" if len(args) == 2 else "mapping"
    return {float: "a number", int: "an int", str: "a string", bool: "a bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _flow(value: Any) -> str:
    return yaml.safe_dump(to_tree(value), default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


def _comment(indent: str, head: str, text: str, width: int = 118) -> list[str]:
    """`head  # text`, the comment wrapped onto aligned continuation lines."""
    col = max(len(head) + 2, 34)
    lines, line = [], head.ljust(col) + "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and not line.endswith("#"):
            lines.append(line)
            line = indent + " " * (col - len(indent)) + "#"
        line += " " + word
    return lines + [line]


def reference(cls, indent: str = "") -> list[str]:
    """An annotated YAML of every key with its default, type and documentation (the README's reference)."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, doc = hints[f.name], docs.get(f.name, "")
        if dataclasses.is_dataclass(tp):
            out += _comment(indent, f"{indent}{f.name}:", doc) + reference(tp, indent + "  ")
            continue
        value_tp = typing.get_args(tp)[1] if typing.get_origin(tp) is dict and len(typing.get_args(tp)) == 2 else None
        if value_tp is not None and dataclasses.is_dataclass(value_tp):
            out += _comment(indent, f"{indent}{f.name}:", doc)
            out += _comment(indent, f"{indent}  <key>:", f"one entry per key ({value_tp.__name__}):")
            out += reference(value_tp, indent + "    ")
            continue
        if f.default is not _MISSING:
            default = _flow(f.default)
        elif f.default_factory is not _MISSING:
            default = _flow(f.default_factory())
        else:
            default = "<required>"
        out += _comment(indent, f"{indent}{f.name}: {default}", f"({_type_name(tp)}) {doc}")
    return out


def undocumented(cls, prefix: str = "") -> list[str]:
    """Dotted keys without an attribute docstring (the documentation test wants none)."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}.{f.name}" if prefix else f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += undocumented(tp, key)
        elif f.name not in docs:
            out.append(key)
    return out


__all__ = ["build", "build_config", "field_docs", "parse_overrides", "reference", "set_dotted", "to_tree",
           "undocumented"]
