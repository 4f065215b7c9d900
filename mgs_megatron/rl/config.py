"""The trainer's configuration: one YAML section per component, each section that component's own config class.

    cfg = load_config("examples/tiny_cpu.yaml", ["strategy=mgs", "mgs.rule=pcgrad", "run.total_steps=20"])

    run       RunConfig (below)              output directory, steps, cadence of validation and checkpoints
    launcher  LauncherConfig (below)         processes per node, device
    model     ModelSourceConfig (below)      where the weights and the tokenizer come from, parameter dtype
    parallel  megatron.model.ParallelConfig  TP / PP / virtual PP
    data      data.DataConfig                prompt sources, domain proportions, validation split
    rollout   rollout.RolloutConfig          generation engine, sampling, lengths, weight sync
    algo      rl.algos.AlgoConfig            advantages, policy loss, KL, entropy
    optim     megatron.optim.OptimConfig     Adam, clipping, micro-batch size
    strategy                                 mixed | sequential | mgs
    mgs       surgery.SurgeryConfig          the surgery (strategy mgs)
    rewards   rewards.RewardConfig           a reward per domain (rewards.DomainRewardSpec), per-item deadline,
                                             when a failing reward stops the run
    warmup    rl.warmup.WarmupConfig         supervised warm-up of the toy job

Every key is checked against these dataclasses before anything heavy happens (mgs_megatron/config.py: an unknown
key, a wrong type or a choice not offered raises one `ConfigError` naming the dotted key); `check_paths(cfg)` then
checks the files (data rows, model and tokenizer directories, the parallel layout against the model, every domain's
reward resolved, the output directory writable and not holding another run's checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from mgs_megatron.config import build_config, to_tree
from mgs_megatron.data.prompt_sampler import DataConfig
from mgs_megatron.errors import ConfigError
from mgs_megatron.megatron.model import ParallelConfig
from mgs_megatron.megatron.optim import OptimConfig
from mgs_megatron.rewards.manager import RewardConfig
from mgs_megatron.rl.algos import AlgoConfig
from mgs_megatron.rl.warmup import WarmupConfig
from mgs_megatron.rollout.config import RolloutConfig
from mgs_megatron.surgery.config import SurgeryConfig

_GROUP_RELATIVE = ("grpo", "rloo")  # advantage estimators relative to the prompt's group of rollout.n samples


@dataclass
class RunConfig:
    """The run: where it writes, how long it trains, and when it validates, checkpoints and logs."""

    name: str = "run"
    """Run name (progress bar, Weights & Biases)."""
    output_dir: str = "runs/run"
    """Metrics, checkpoints, plots and the final HF export go here."""
    seed: int = 1234
    """Seeds the prompt sampler, rollouts, Megatron's initialisation and the warm-up."""
    total_steps: int = 10
    """RL steps (one optimizer update each)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only on SIGTERM and at the end)."""
    val_every: int = 0
    """Validate every N steps (0: only at the start and the end, when val_prompts_per_domain > 0)."""
    val_prompts_per_domain: int = 0
    """Held-out prompts per domain scored greedily at validation (0: no validation)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars to <output_dir>/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install wandb; WANDB_MODE as usual)."""
    wandb_project: str = ""
    """Weights & Biases project ('': the run name)."""
    resume: Literal["auto", "never", "overwrite"] = "auto"
    """'auto': continue from the newest complete checkpoint in <output_dir>/checkpoints (a damaged one is skipped,
    with a warning naming its file), else start at step 0; 'never': start at step 0, refusing an output_dir that
    already holds checkpoints; 'overwrite': start at step 0, deleting the checkpoints and metrics already there."""
    export_hf: bool = True
    """Write the final model as an HF directory to <output_dir>/hf."""
    progress: bool = True
    """Show a progress bar."""
    fail_at_step: int = -1
    """Testing aid: exit (a simulated crash) right after this step's checkpoint (-1: never)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (older ones are deleted after a new one is complete)."""
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    """Messages shown (rank 0): 'warning' shows ours (damaged checkpoint, failing reward, truncated prompts) and
    hides the libraries' (vLLM's start-up lines, torch / Triton / NUMA warnings); 'debug' shows everything."""
    checkpoint_format: Literal["mgs", "torch_dist"] = "mgs"
    """Model weights in checkpoints: 'mgs' (in the per-rank files; resume at the same layout only); 'torch_dist'
    (Megatron-LM's format in step_<N>/model/, which Megatron-LM, verl and slime load, and a resume at another
    TP / PP / world size loads; the optimizer state stays per rank and restarts when the layout changed)."""

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1")


@dataclass
class LauncherConfig:
    """How `mgs-train` starts the ranks on this node."""

    nproc_per_node: int = 1
    """Ranks per node (mgs-train re-launches itself through torchrun when > 1)."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """'cpu' (gloo, Megatron-Core through the CPU backend), 'cuda' (NCCL), 'auto': cuda when a GPU is usable."""
    threads_per_proc: int = 1
    """torch CPU threads per rank."""
    collective_timeout_s: float = 3600.0
    """Timeout of every collective (torch.distributed and Megatron's groups): long, because rank 0 converts or
    exports a whole model while the other ranks wait."""

    def __post_init__(self):
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s={self.collective_timeout_s} must be > 0")


@dataclass
class ModelSourceConfig:
    """Where the policy starts from: an HF directory, a converted checkpoint, or an HF config (from scratch)."""

    path: str = ""
    """HF model directory (weights, config, tokenizer); converted once into <output_dir>/init_mcore by rank 0."""
    hf_config: dict = field(default_factory=dict)
    """From scratch: an HF config dict (model_type, sizes, ...) instead of path."""
    tokenizer: str = ""
    """Tokenizer directory ('': path)."""
    init_checkpoint: str = ""
    """Megatron checkpoint to start from, written at any TP/PP: canonical (tools/convert_checkpoint.py) or
    Megatron-LM torch_dist (the directory with latest_checkpointed_iteration.txt, or an iter_* directory); it
    overrides the weights of path (no conversion at start)."""
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype (bfloat16 keeps fp32 main parameters and gradients in the optimizer)."""

    def __post_init__(self):
        if self.path and self.hf_config:
            raise ConfigError("config keys 'model.path' and 'model.hf_config' are both set: the model's config "
                              "comes from model.path; clear the other (model.hf_config={})")
        if not (self.path or self.hf_config):
            raise ConfigError("config key 'model.path': set an HF model directory (or model.hf_config to start "
                              "from scratch)")


@dataclass
class TrainConfig:
    """The whole run (see the module docstring for the sections)."""

    model: ModelSourceConfig
    """The initial policy."""
    data: DataConfig
    """Prompts."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Ranks and device."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron's layout."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The RL objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    strategy: Literal["mixed", "sequential", "mgs"] = "mgs"
    """'mgs': per-domain gradients combined by the surgery; 'mixed': all domains in one gradient (Mixed RL);
    'sequential': one domain after another (data.stages)."""
    mgs: SurgeryConfig = field(default_factory=SurgeryConfig)
    """The surgery (strategy mgs)."""
    rewards: RewardConfig = field(default_factory=RewardConfig)
    """Rewards: one per domain, the per-item deadline, when a failing reward stops the run."""
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    """Supervised warm-up (toy job)."""

    def __post_init__(self):
        from mgs_megatron.rl.losses import training_temperature

        if not self.data.sources:
            raise ConfigError("config key 'data.sources': no prompt data given")
        try:
            training_temperature(self.algo, self.rollout.temperature)
        except ValueError as e:
            raise ConfigError(f"config key 'algo.logprob_temperature': {e}") from None
        if self.algo.adv_estimator in _GROUP_RELATIVE and self.rollout.n < 2:
            raise ConfigError(f"config key 'rollout.n': {self.rollout.n} sample per prompt, but "
                              f"algo.adv_estimator={self.algo.adv_estimator!r} scores each sample against the other "
                              f"samples of its prompt: every advantage would be 0 and nothing would train (set "
                              f"rollout.n >= 2)")

    def to_dict(self) -> dict:
        return to_tree(self)


def config_from_dict(tree: dict, overrides=()) -> TrainConfig:
    return build_config(TrainConfig, tree, overrides)


def load_config(path, overrides=()) -> TrainConfig:
    """A YAML file plus dotted overrides ("optim.lr=2e-6") -> TrainConfig (relative paths stay as written)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        tree = yaml.safe_load(p.read_text()) or {}
    return config_from_dict(tree, overrides)


def read_hf_config(cfg: TrainConfig) -> dict:
    """model.hf_config, or model.path's config.json."""
    import json

    return dict(cfg.model.hf_config) or json.loads((Path(cfg.model.path) / "config.json").read_text())


def model_config_of(cfg: TrainConfig):
    """The ModelConfig of the configured model (ConfigError naming the HF field it cannot support)."""
    from mgs_megatron.models import model_config_from_hf

    return model_config_from_hf(read_hf_config(cfg))


def check_paths(cfg: TrainConfig, world_size: int | None = None) -> dict:
    """File-level checks, up front: model path reachable, the model's config supported and the parallel layout fits
    it (and `world_size`, when given), data rows valid (file, row and field named), every domain's reward resolved
    (imported, not built), the output directory writable and, with run.resume=never, free of checkpoints.
    Returns {domain: [PromptSample]} of the training sources (loaded once here)."""
    from mgs_megatron.data import DataValidationError, load_sources
    from mgs_megatron.rewards import DOMAIN_DEFAULTS, resolve_reward, unknown_kwargs
    from mgs_megatron.rl.resume import check_output_dir

    m = cfg.model
    if m.path and not (Path(m.path) / "config.json").is_file():
        raise ConfigError(f"config key 'model.path': {m.path!r} is not reachable (no config.json there)")
    tok = m.tokenizer or m.path
    if not tok or not Path(tok).is_dir():
        raise ConfigError(f"config key 'model.tokenizer': tokenizer directory {tok!r} is not reachable")
    if m.init_checkpoint and not Path(m.init_checkpoint).is_dir():
        raise ConfigError(f"config key 'model.init_checkpoint': {m.init_checkpoint!r} does not exist")
    model_key = "model.path" if m.path else "model.hf_config"
    try:
        model_cfg = model_config_of(cfg)
    except ValueError as e:  # ConfigError, or a config.json that is not JSON
        raise ConfigError(f"config key '{model_key}': {e}") from None
    try:
        cfg.parallel.check(model_cfg, world_size)
    except ConfigError as e:
        raise ConfigError(f"config key 'parallel' (model from {model_key}): {e}") from None
    for key, srcs in (("data.sources", cfg.data.sources), ("data.val_sources", cfg.data.val_sources)):
        for s in srcs:
            path = s if isinstance(s, str) else (s.get("path") if isinstance(s, dict) else None)
            if not path or not Path(path).exists():
                raise ConfigError(f"config key '{key}': data file {path!r} does not exist")
    try:
        data = load_sources(list(cfg.data.sources))
    except DataValidationError as e:
        raise ConfigError(f"config key 'data.sources': {e}") from None
    try:
        if cfg.data.val_sources:
            load_sources(list(cfg.data.val_sources))
    except DataValidationError as e:
        raise ConfigError(f"config key 'data.val_sources': {e}") from None
    for d in list(cfg.data.proportions) or list(data):
        if d not in data:
            raise ConfigError(f"config key 'data.proportions.{d}': no prompts of domain {d!r} in data.sources")
        spec = cfg.rewards.domains.get(d)
        if spec is None and d not in DOMAIN_DEFAULTS:
            raise ConfigError(f"config key 'rewards.domains.{d}': domain {d!r} has no reward (set "
                              f"rewards.domains.{d}.reward)")
        spec = cfg.rewards.spec(d)
        try:
            found = resolve_reward(spec.reward)
        except ValueError as e:
            raise ConfigError(f"config key 'rewards.domains.{d}.reward': {e}") from None
        bad = unknown_kwargs(found, spec.kwargs)
        if bad:
            raise ConfigError(f"config key 'rewards.domains.{d}.kwargs.{bad[0]}': reward {spec.reward!r} takes no "
                              f"argument {bad[0]!r}")
        if spec.reward in ("reward_model", "chat") and not spec.kwargs.get("model_path"):
            raise ConfigError(f"config key 'rewards.domains.{d}.kwargs.model_path': the reward model of domain "
                              f"{d!r} needs a model_path")
        if spec.kwargs.get("model_path") and not Path(spec.kwargs["model_path"]).is_dir():
            raise ConfigError(f"config key 'rewards.domains.{d}.kwargs.model_path': {spec.kwargs['model_path']!r} "
                              f"is not reachable")
    check_output_dir(cfg.run)
    return data


__all__ = ["ConfigError", "LauncherConfig", "ModelSourceConfig", "RunConfig", "TrainConfig", "check_paths",
           "config_from_dict", "load_config"]
