"""Typed trainer configuration: dataclasses, YAML files and dotted command-line overrides.

    cfg = load_config("examples/tiny_cpu.yaml", ["strategy=mgs", "mgs.rule=pcgrad", "run.total_steps=20"])

Every key is checked against the dataclasses before anything heavy happens: an unknown key, a value of the wrong
type or an out-of-range choice raises one `ConfigError` naming the dotted key. `check_paths(cfg)` then checks the
files (data sources exist and every row has a domain, every domain has a reward, the model path is reachable).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


STRATEGIES = ("mixed", "sequential", "mgs")
BACKENDS = ("vllm", "megatron")


@dataclass
class RunSection:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 1234
    total_steps: int = 10
    save_every: int = 0                 # 0: only on SIGTERM and at the end
    val_every: int = 0                  # 0: no periodic validation (still at start and end if val_prompts > 0)
    val_prompts_per_domain: int = 0
    tensorboard: bool = True
    wandb: bool = False                 # also log to Weights & Biases (pip install wandb; WANDB_MODE as usual)
    wandb_project: str = ""             # default: the run name
    resume: str = "auto"                # auto | never
    export_hf: bool = True              # final HF export to <output_dir>/hf
    progress: bool = True
    fail_at_step: int = -1              # testing aid: raise SystemExit (simulated crash) after this step's save
    keep_checkpoints: int = 2


@dataclass
class LauncherSection:
    nproc_per_node: int = 1
    device: str = "cpu"                 # cpu | cuda | auto
    threads_per_proc: int = 1


@dataclass
class ModelSection:
    path: str = ""                      # HF directory (weights + config + tokenizer)
    hf_config: dict = field(default_factory=dict)   # from scratch: an HF config dict (model_type, sizes, ...)
    tokenizer: str = ""                 # tokenizer dir (default: path)
    init_checkpoint: str = ""           # canonical Megatron checkpoint to start from (e.g. a warm-up's output)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    params_dtype: str = "float32"       # float32 | bfloat16


@dataclass
class DataSection:
    sources: list = field(default_factory=list)     # jsonl / parquet / dataset dirs (rows carry `domain`)
    proportions: dict = field(default_factory=dict)  # {} = equal over the domains found
    prompts_per_step: int = 6
    val_sources: list = field(default_factory=list)  # held-out prompts; default: the tail of each training domain
    val_holdout: int = 16               # when val_sources is empty: last N prompts of each domain held out


@dataclass
class RolloutSection:
    backend: str = "megatron"           # vllm | megatron (fallback: token-by-token sampling with Megatron)
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_len: int = 64
    max_response_len: int = 24
    kv_cache_bytes: int = 268435456
    dtype: str = "float32"
    rollout_tp: int = 1
    logprob_diff_warn: float = 0.0      # warn when max |vLLM - Megatron| token logprob exceeds this (0: off)


@dataclass
class AlgoSection:
    adv_estimator: str = "grpo"
    norm_adv_by_std: bool = True
    adv_eps: float = 1e-6
    policy_loss: str = "clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.001
    kl_type: str = "low_var_kl"
    entropy_coef: float = 0.001
    filter_zero_variance: bool = False


@dataclass
class OptimSection:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    micro_batch_size: int = 4
    use_distributed_optimizer: bool = True


@dataclass
class MGSSection:  # fields are SurgeryConfig's (validated and passed through as a whole)
    rule: str = "pcgrad"
    granularity: str = "parameter"
    seed: int = 0
    kernel: str = "auto"                # surgery kernels: auto | eager | compiled (SurgeryConfig.kernel)


@dataclass
class SequentialSection:
    stages: list = field(default_factory=list)      # [[domain, num_steps], ...]; default: steps_per_stage each
    steps_per_stage: int = 1


@dataclass
class WarmupSection:
    steps: int = 0                      # supervised warm-up steps on noisy toy demonstrations (0: none)
    lr: float = 3e-3
    batch_size: int = 32
    noise: float = 0.3                  # fraction of corrupted demonstrations
    cache: str = ""                     # canonical checkpoint cached here (default <output_dir>/../warmup-<hash>)


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    launcher: LauncherSection = field(default_factory=LauncherSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: OptimSection = field(default_factory=OptimSection)
    strategy: str = "mgs"
    mgs: MGSSection = field(default_factory=MGSSection)
    sequential: SequentialSection = field(default_factory=SequentialSection)
    rewards: dict = field(default_factory=dict)     # domain -> {reward, kwargs, weight}
    warmup: WarmupSection = field(default_factory=WarmupSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ parsing
def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
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
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key '{where}' (known in '{prefix or '<root>'}': {sorted(names)})")
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, key)
        else:
            kwargs[k] = _check_type(key, v, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    cls = TrainConfig
    for i, p in enumerate(parts[:-1]):
        hints = typing.get_type_hints(cls) if cls is not None else {}
        if cls is not None and p not in hints:
            raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}'")
        cls = hints.get(p) if cls is not None and dataclasses.is_dataclass(hints.get(p)) else None
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is not a mapping")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key.path=value")
        k, v = o.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v.strip() else ""))
    return out


def config_from_dict(tree: dict, overrides: list[str] = ()) -> TrainConfig:
    tree = json.loads(json.dumps(tree or {}))  # deep copy of plain data
    for k, v in parse_overrides(list(overrides)):
        _set_dotted(tree, k, v)
    cfg = _build(TrainConfig, tree, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        tree = yaml.safe_load(p.read_text()) or {}
        base = p.parent
        # relative paths in the file are relative to the repository root when run from it; keep them as written
        del base
    return config_from_dict(tree, overrides)


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")


def validate(cfg: TrainConfig) -> None:
    """Value checks that need no files."""
    from mgs_megatron.rl import algos

    _choice("strategy", cfg.strategy, STRATEGIES)
    _choice("rollout.backend", cfg.rollout.backend, BACKENDS)
    _choice("launcher.device", cfg.launcher.device, ("cpu", "cuda", "auto"))
    _choice("run.resume", cfg.run.resume, ("auto", "never"))
    _choice("model.params_dtype", cfg.model.params_dtype, ("float32", "bfloat16"))
    _choice("algo.adv_estimator", cfg.algo.adv_estimator, sorted(algos.ADVANTAGE_ESTIMATORS))
    _choice("algo.policy_loss", cfg.algo.policy_loss, sorted(algos.POLICY_LOSSES))
    _choice("algo.kl_type", cfg.algo.kl_type, sorted(algos.KL_ESTIMATORS))
    try:
        from mgs_megatron.surgery import SurgeryConfig

        SurgeryConfig(**dataclasses.asdict(cfg.mgs))
    except ValueError as e:
        raise ConfigError(f"config key 'mgs': {e}") from None
    for key in ("run.total_steps", "launcher.nproc_per_node", "data.prompts_per_step", "rollout.n",
                "rollout.max_response_len", "rollout.max_prompt_len", "optim.micro_batch_size"):
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) < 1:
            raise ConfigError(f"config key '{key}': must be >= 1, got {getattr(getattr(cfg, sec), name)}")
    if cfg.model.path and cfg.model.hf_config:
        raise ConfigError("config keys 'model.path' and 'model.hf_config' are both set: the model's config comes "
                          "from model.path; clear the other (model.hf_config={})")
    if not (cfg.model.path or cfg.model.hf_config):
        raise ConfigError("config key 'model.path': set an HF model directory (or model.hf_config to start from "
                          "scratch)")
    if not cfg.data.sources:
        raise ConfigError("config key 'data.sources': no prompt data given")
    for d, spec in cfg.rewards.items():
        if not isinstance(spec, dict) or "reward" not in spec or set(spec) - {"reward", "kwargs", "weight"}:
            raise ConfigError(f"config key 'rewards.{d}': expected {{reward: name, kwargs: {{...}}, weight: w}}, "
                              f"got {spec!r}")
    for i, st in enumerate(cfg.sequential.stages):
        if not (isinstance(st, (list, tuple)) and len(st) == 2 and isinstance(st[0], str) and isinstance(st[1], int)):
            raise ConfigError(f"config key 'sequential.stages[{i}]': expected [domain, num_steps], got {st!r}")


def check_paths(cfg: TrainConfig) -> dict:
    """File-level checks, up front: model path reachable, data rows carry a domain, every domain has a reward.
    Returns {domain: [PromptSample]} of the training sources (loaded once here)."""
    from mgs_megatron.data import DataValidationError, load_sources
    from mgs_megatron.rewards import DOMAIN_DEFAULTS

    m = cfg.model
    if m.path:
        p = Path(m.path)
        if not (p / "config.json").is_file():
            raise ConfigError(f"config key 'model.path': {m.path!r} is not reachable (no config.json there)")
    tok = m.tokenizer or m.path
    if not tok or not Path(tok).is_dir():
        raise ConfigError(f"config key 'model.tokenizer': tokenizer directory {tok!r} is not reachable")
    if m.init_checkpoint and not Path(m.init_checkpoint).is_dir():
        raise ConfigError(f"config key 'model.init_checkpoint': {m.init_checkpoint!r} does not exist")
    for key, srcs in (("data.sources", cfg.data.sources), ("data.val_sources", cfg.data.val_sources)):
        for s in srcs:
            path = s if isinstance(s, str) else (s.get("path") if isinstance(s, dict) else None)
            if not path or not Path(path).exists():
                raise ConfigError(f"config key '{key}': data file {path!r} does not exist")
    try:
        data = load_sources(list(cfg.data.sources))
    except DataValidationError as e:
        raise ConfigError(f"config key 'data.sources': {e}") from None
    domains = list(cfg.data.proportions) or list(data)
    for d in domains:
        if d not in data:
            raise ConfigError(f"config key 'data.proportions.{d}': no prompts of domain {d!r} in data.sources")
        spec = cfg.rewards.get(d)
        if spec is None and d not in DOMAIN_DEFAULTS:
            raise ConfigError(f"config key 'rewards.{d}': domain {d!r} has no reward (set rewards.{d}.reward)")
        name = (spec or {}).get("reward", DOMAIN_DEFAULTS.get(d))
        if name in ("reward_model", "chat") and not (spec or {}).get("kwargs", {}).get("model_path"):
            raise ConfigError(f"config key 'rewards.{d}.kwargs.model_path': the reward model of domain {d!r} "
                              f"needs a model_path")
        mp = (spec or {}).get("kwargs", {}).get("model_path")
        if mp and not Path(mp).is_dir():
            raise ConfigError(f"config key 'rewards.{d}.kwargs.model_path': {mp!r} is not reachable")
    return data
