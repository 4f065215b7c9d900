"""SurgeryConfig: the validated, plain-dataclass configuration of the surgery core (the trainer's `mgs:` section)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from .compiled import check_kernel
from .layout import GRANULARITIES
from .rules import RULES, Rule, get_rule, rule_options

NonFinitePolicy = Literal["error", "skip_step", "sum"]
NONFINITE_POLICIES = get_args(NonFinitePolicy)


@dataclass
class SurgeryConfig:
    """How the per-domain gradients of each module are combined (see surgery/__init__.py for the flow)."""

    rule: str = "pcgrad"
    """'sum' (Mixed RL), 'pcgrad' (the paper's MGS), 'gradvac', or a name added with surgery.register_rule."""
    granularity: Literal["parameter", "mcore-parameter", "layer", "global"] = "parameter"
    """Module = one HF tensor ('parameter', the paper's), one Megatron tensor, one layer, or the whole model
    ('global': global PCGrad, the paper's baseline)."""
    seed: int = 0
    """Seeds the per-(step, module) random order in which PCGrad / GradVac visit the other domains."""
    eps: float = 0.0
    """Domain j is projected against only if |g_j|^2 > eps (absolute; the official code uses 1e-12), so all-zero
    or missing gradients are skipped."""
    gradvac_beta: float = 0.01
    """EMA rate of GradVac's cosine targets."""
    on_nonfinite: NonFinitePolicy = "error"
    """'error' raises naming the modules and domains with a non-finite Gram entry; 'skip_step' skips the optimizer
    step (parameters and optimizer state untouched, as the official code does on a non-finite gradient norm);
    'sum' falls back to the plain sum for those modules (their combined gradient stays non-finite). Non-finite
    modules are counted in surgery/nonfinite_modules."""
    kernel: Literal["auto", "eager", "compiled"] = "auto"
    """'auto': one-pass torch.compile kernels for runs of >= 1M elements, eager if compilation fails; 'eager':
    batched matmuls only; 'compiled': compiled for every run of >= 8192 elements (a compilation failure raises)."""

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown surgery rule {self.rule!r}; expected one of {sorted(RULES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; expected one of {GRANULARITIES}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"unknown on_nonfinite {self.on_nonfinite!r}; expected one of {NONFINITE_POLICIES}")
        check_kernel(self.kernel)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if not 0.0 <= self.gradvac_beta <= 1.0:
            raise ValueError(f"gradvac_beta must be in [0, 1], got {self.gradvac_beta!r}")

    def make_rule(self) -> Rule:
        opts = {"seed": self.seed, "eps": self.eps, "beta": self.gradvac_beta}
        accepted = rule_options(self.rule)  # each rule takes the subset of options it knows
        return get_rule(self.rule, **{k: v for k, v in opts.items() if k in accepted})

    def to_dict(self) -> dict:
        return asdict(self)
