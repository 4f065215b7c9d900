"""Reward interface, registry and failure accounting.

A reward scores a batch of `RewardInput`s and returns one `ScoreOutcome` per item. Rewards never raise into
the trainer: `safe_score_batch` turns exceptions into score 0 with status "failed"; rewards that enforce a
timeout report status "timeout" (also score 0). Counters are kept per domain by `RewardManager`.

Registry (like verl's core_algos): `@register_reward("name")` on a Reward subclass or a factory; a user reward
is given by dotted path "pkg.module:fn" or "pkg.module.fn" and may be
  - a Reward subclass (instantiated with the spec's kwargs),
  - a plain function `fn(prompt, response, sample) -> float`, scored item by item in worker processes with a
    per-item deadline (`item_timeout_s`, the same as math_verify's; None: in this process, no deadline), or
  - a factory returning a Reward.
`resolve_reward` finds (imports) a name or dotted path without building it: the config check calls it before any
rank starts, so a misspelt reward is an error up front, not a run of zeros.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

OK, FAILED, TIMEOUT = "ok", "failed", "timeout"
DEFAULT_TIMEOUT_S = 5.0  # per-item deadline of math_verify and of user functions (rewards.timeout_s)


@dataclass
class RewardInput:
    """One response to score. `prompt` is a str or a list of {role, content} messages; `sample` is the data
    row (ground-truth fields such as `answer`, `instruction_id_list`, `kwargs`)."""
    prompt: Any
    response: str
    sample: dict = field(default_factory=dict)
    domain: str = ""


@dataclass
class ScoreOutcome:
    score: float
    status: str = OK          # ok | failed | timeout
    error: str | None = None


class Reward:
    """Base class. Override `score_one` (item by item) or `score_batch` (batched, e.g. a reward model)."""

    name = "reward"
    has_accuracy = False  # True where full marks mean "correct" (acc/<domain> = fraction at score >= 1)

    def score_one(self, item: RewardInput) -> float:
        raise NotImplementedError

    def score_batch(self, items: Sequence[RewardInput]) -> list[ScoreOutcome]:
        return [_safe_one(self.score_one, item) for item in items]

    def close(self) -> None:
        """Release workers/models. Idempotent."""


def _safe_one(fn: Callable[[RewardInput], float], item: RewardInput) -> ScoreOutcome:
    try:
        return ScoreOutcome(float(fn(item)))
    except Exception as e:  # a broken reward must not crash training
        return ScoreOutcome(0.0, FAILED, f"{type(e).__name__}: {e}")


def safe_score_batch(reward: Reward, items: Sequence[RewardInput]) -> list[ScoreOutcome]:
    """score_batch that never raises and always returns len(items) outcomes with finite scores."""
    try:
        outs = list(reward.score_batch(items))
        if len(outs) != len(items):
            raise RuntimeError(f"reward {reward.name!r} returned {len(outs)} outcomes for {len(items)} items")
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        logger.warning("reward %s failed on a batch of %d: %s", reward.name, len(items), msg)
        return [ScoreOutcome(0.0, FAILED, msg) for _ in items]
    fixed = []
    for o in outs:
        if not isinstance(o, ScoreOutcome):  # a plain number was returned
            try:
                o = ScoreOutcome(float(o))
            except Exception as e:
                o = ScoreOutcome(0.0, FAILED, f"bad score {o!r}: {e}")
        if o.score != o.score or o.score in (float("inf"), float("-inf")):  # NaN / inf -> failure
            o = ScoreOutcome(0.0, FAILED, f"non-finite score {o.score}")
        fixed.append(o)
    return fixed


class FunctionReward(Reward):
    """Wraps a plain `fn(prompt, response, sample) -> float`."""

    def __init__(self, fn: Callable[..., float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")

    def score_one(self, item: RewardInput) -> float:
        return self.fn(item.prompt, item.response, item.sample)


# ---------------------------------------------------------------- registry
REWARD_REGISTRY: dict[str, Callable[..., Reward]] = {}
# domain -> default reward name
DOMAIN_DEFAULTS: dict[str, str] = {"math": "math_verify", "if": "ifeval", "chat": "reward_model"}


def register_reward(name: str, *domains: str):
    """Decorator registering a Reward class/factory under `name` (and as the default for `domains`)."""
    def deco(obj):
        if name in REWARD_REGISTRY:
            raise ValueError(f"reward {name!r} is already registered ({REWARD_REGISTRY[name].__name__})")
        REWARD_REGISTRY[name] = obj
        for d in domains:
            DOMAIN_DEFAULTS[d] = name
        return obj
    return deco


def import_by_path(path: str) -> Any:
    """'pkg.module:attr' or 'pkg.module.attr' -> the object."""
    if ":" in path:
        mod, _, attr = path.partition(":")
    else:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise ValueError(f"not a dotted path 'pkg.module:fn': {path!r}")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _ensure_builtin_registered() -> None:
    # Builtins register on import; import lazily so `base` stays light (no torch / math_verify here).
    from . import chat_rm, ifeval, math_reward, worker  # noqa: F401


def reward_has_accuracy(name_or_path: str) -> bool:
    """Whether a registered reward's full marks mean "correct" (without building it: no model is loaded)."""
    _ensure_builtin_registered()
    obj = REWARD_REGISTRY.get(DOMAIN_DEFAULTS.get(name_or_path, name_or_path))
    return bool(getattr(obj, "has_accuracy", False))


def resolve_reward(name_or_path: str) -> Any:
    """The registered class / factory of a name (or of a domain's default reward), or the object a dotted path
    names; ValueError saying what is wrong (unknown name, import failure, not callable). Builds nothing."""
    _ensure_builtin_registered()
    key = DOMAIN_DEFAULTS.get(name_or_path, name_or_path)
    if key in REWARD_REGISTRY:
        return REWARD_REGISTRY[key]
    if "." not in name_or_path and ":" not in name_or_path:
        raise ValueError(f"unknown reward {name_or_path!r}: not a registered reward ({sorted(REWARD_REGISTRY)}), "
                         f"not a domain with a default reward ({sorted(DOMAIN_DEFAULTS)}), and not a dotted path "
                         f"'pkg.module:fn'")
    try:
        obj = import_by_path(name_or_path)
    except Exception as e:  # noqa: BLE001 - any import-time error of the user's module is the user's to see
        raise ValueError(f"reward {name_or_path!r} cannot be imported: {type(e).__name__}: {e}") from None
    if not (callable(obj) or isinstance(obj, Reward)):
        raise ValueError(f"reward {name_or_path!r} is a {type(obj).__name__}, not a function, a Reward or a factory")
    return obj


def unknown_kwargs(obj: Any, kwargs: dict) -> list[str]:
    """The keys of `kwargs` that the reward class / factory `obj` does not take (none when it takes **kwargs or
    has no readable signature)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return sorted(k for k in kwargs if k not in params)


def _is_plain_function(obj: Any, kwargs: dict) -> bool:
    try:
        n_params = len(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return False
    return not inspect.isclass(obj) and n_params >= 3 and not kwargs


def build_reward(name_or_path: str, item_timeout_s: float | None = DEFAULT_TIMEOUT_S, **kwargs) -> Reward:
    """Registry name, domain name (its default reward) or dotted path -> a Reward instance. `item_timeout_s`: the
    per-item deadline (rewards.timeout_s) of a plain function by dotted path (run in worker processes; None: in this
    process without one) and of a registered reward that takes `timeout_s` (math_verify) unless kwargs set it."""
    obj = resolve_reward(name_or_path)
    if DOMAIN_DEFAULTS.get(name_or_path, name_or_path) in REWARD_REGISTRY:
        if item_timeout_s is not None and "timeout_s" not in kwargs and _takes(obj, "timeout_s"):
            kwargs["timeout_s"] = item_timeout_s
        return obj(**kwargs)
    if inspect.isclass(obj) and issubclass(obj, Reward):
        return obj(**kwargs)
    if isinstance(obj, Reward):
        return obj
    if _is_plain_function(obj, kwargs):  # fn(prompt, response, sample)
        if item_timeout_s is None:
            return FunctionReward(obj, name=name_or_path)
        from .worker import ProcessFunctionReward

        return ProcessFunctionReward(target=name_or_path, timeout_s=item_timeout_s)
    made = obj(**kwargs)  # factory
    if isinstance(made, Reward):
        return made
    raise TypeError(f"{name_or_path} is neither fn(prompt, response, sample) nor a Reward factory")


def _takes(obj: Any, param: str) -> bool:
    try:
        return param in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
