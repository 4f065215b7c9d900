"""The prompt sampler: which prompts of which domains go into each step.

Mixed (strategies mixed and mgs), mix="quota" (default): every step gets round(prompts_per_step * p_d)
prompts of domain d, with a carried remainder ("credit") so long-run counts are exact and every domain with
p_d * N >= 1 appears each step (MGS needs every domain's gradient each step). mix="random": each prompt's domain
is drawn at random with probability p_d (the official code's WeightedRandomSampler), i.e. counts ~
Multinomial(N, p), drawn from a generator seeded by (seed, step). Sequential (the paper's Sequential RL baseline):
one domain per step, following `stages`.
Within a domain prompts are drawn without replacement, in an order reshuffled every epoch from
(seed, crc32(domain), epoch). Deterministic given the seed; resumable (state_dict / load_state_dict).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .schema import PromptSample
from .sources import SourceConfig, load_sources


@dataclass
class DataConfig:
    """Prompt data and how each step's prompts are drawn from it."""

    sources: list = field(default_factory=list)
    """Training prompts: jsonl / parquet files, `datasets` directories or folders of them (rows carry `domain`);
    an entry may also be {path, domain, max_rows}."""
    proportions: dict[str, float] = field(default_factory=dict)
    """Share of each domain per step ({} = equal over the domains found); a domain absent here is not trained."""
    prompts_per_step: int = 6
    """Prompts per step over all domains (each gets rollout.n samples)."""
    mix: Literal["quota", "random"] = "quota"
    """'quota': exact per-step counts with carried remainders (every domain every step); 'random': each prompt's
    domain drawn at random with the proportions (the official code; a domain may be absent from a step)."""
    stages: list = field(default_factory=list)
    """Strategy 'sequential': [[domain, num_steps], ...] in order (the last stage continues); [] = each domain for
    steps_per_stage steps in proportions order."""
    steps_per_stage: int = 1
    """Strategy 'sequential' without stages: steps per domain."""
    val_sources: list = field(default_factory=list)
    """Held-out validation prompts; [] = the last val_holdout prompts of each training domain."""
    val_holdout: int = 16
    """When val_sources is empty: prompts per domain held out of training for validation."""
    chat_template: str = ""
    """How prompts are rendered: '' = the tokenizer's own chat template; 'think' = the official runs' thinking
    prompt for base models (<think> plan </think> <response> answer </response>; data/templates.py); else a Jinja
    template or the path of a file holding one."""

    def __post_init__(self):
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} must be >= 1")
        from .templates import resolve_chat_template

        resolve_chat_template(self.chat_template)  # a bad name or path fails at config time
        for i, st in enumerate(self.stages):
            if not (isinstance(st, (list, tuple)) and len(st) == 2 and isinstance(st[0], str)
                    and isinstance(st[1], int)):
                raise ValueError(f"stages[{i}]: expected [domain, num_steps], got {st!r}")


def train_val_split(data: dict[str, list[PromptSample]], config: DataConfig, val_per_domain: int
                    ) -> tuple[dict[str, list[PromptSample]], dict[str, list[PromptSample]]]:
    """(training prompts, validation prompts) per domain. Without val_sources the last val_holdout prompts of each
    domain are held out of training (when the domain has more than twice as many); validation takes the first
    val_per_domain prompts of the held-out pool (or of val_sources)."""
    hold = config.val_holdout if not config.val_sources else 0
    train = {d: v[:-hold] if hold and len(v) > 2 * hold else v for d, v in data.items()}
    pools = load_sources(list(config.val_sources)) if config.val_sources else \
        {d: v[-hold:] if hold else v for d, v in data.items()}
    val = {d: pool[:val_per_domain] if val_per_domain else [] for d, pool in pools.items()}
    return train, val


class PromptSampler:
    """Draws each step's prompts. `schedule`: "mixed" (proportions) or "sequential" (stages)."""

    def __init__(self, config: DataConfig, data: dict[str, list[PromptSample]] | None = None, *,
                 seed: int = 0, schedule: str = "mixed"):
        if schedule not in ("mixed", "sequential"):
            raise ValueError(f"schedule must be 'mixed' or 'sequential', got {schedule!r}")
        if config.mix not in ("quota", "random"):
            raise ValueError(f"mix must be 'quota' or 'random', got {config.mix!r}")
        self.config, self.seed, self.schedule = config, seed, schedule
        self.data = data if data is not None else load_sources(
            [s if isinstance(s, (SourceConfig, str)) else SourceConfig(**s) for s in config.sources])
        props = config.proportions or {d: 1.0 for d in self.data}
        total = float(sum(props.values()))
        if total <= 0 or any(v < 0 for v in props.values()):
            raise ValueError(f"proportions must be non-negative with a positive sum: {props}")
        self.domains = [d for d, v in props.items() if v > 0]
        self.p = np.array([props[d] / total for d in self.domains])
        self.stages = [(d, int(n)) for d, n in (config.stages or [(d, config.steps_per_stage) for d in self.domains])]
        needed = set(self.domains) | {d for d, _ in self.stages} if schedule == "sequential" else set(self.domains)
        for d in needed:
            if not self.data.get(d):
                raise ValueError(f"domain {d!r} has a proportion/stage but no prompts in the sources")
        self.step = 0
        self._credit = np.zeros(len(self.domains))
        self._epoch = {d: 0 for d in self.data}
        self._cursor = {d: 0 for d in self.data}

    # ------------------------------------------------------------ schedule
    def stage_domain(self, step: int) -> str:
        """Sequential schedule: the domain of `step` (the last stage continues after the schedule ends)."""
        for d, n in self.stages:
            if step < n:
                return d
            step -= n
        return self.stages[-1][0]

    def _counts(self) -> dict[str, int]:
        n = self.config.prompts_per_step
        if self.schedule == "sequential":
            return {self.stage_domain(self.step): n}
        if self.config.mix == "random":
            rng = np.random.default_rng([self.seed, self.step, 0x6D6773])
            c = rng.multinomial(n, self.p)
        else:
            credit = self._credit + n * self.p
            c = np.floor(credit + 1e-9).astype(int)
            order = sorted(range(len(c)), key=lambda i: (-(credit[i] - c[i]), i))  # largest remainder
            for i in order[: n - int(c.sum())]:
                c[i] += 1
            self._credit = credit - c
        return {d: int(k) for d, k in zip(self.domains, c) if k > 0}

    # ------------------------------------------------------------ drawing
    def _perm(self, domain: str, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(domain.encode()), epoch])
        return rng.permutation(len(self.data[domain]))

    def _take(self, domain: str, k: int) -> list[PromptSample]:
        out, pool = [], self.data[domain]
        while len(out) < k:
            perm = self._perm(domain, self._epoch[domain])
            cur = self._cursor[domain]
            take = min(k - len(out), len(pool) - cur)
            out.extend(pool[i] for i in perm[cur:cur + take])
            self._cursor[domain] = cur + take
            if self._cursor[domain] == len(pool):
                self._epoch[domain] += 1
                self._cursor[domain] = 0
        return out

    def next_step(self) -> list[PromptSample]:
        """This step's prompts, grouped by domain in config order; advances the state."""
        out: list[PromptSample] = []
        for d, k in self._counts().items():
            out.extend(self._take(d, k))
        self.step += 1
        return out

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"step": self.step, "credit": self._credit.tolist(), "epoch": dict(self._epoch),
                "cursor": dict(self._cursor), "domains": list(self.domains), "seed": self.seed,
                "sizes": {d: len(v) for d, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["domains"] != self.domains or state["seed"] != self.seed:
            raise ValueError("sampler state was saved with other domains/seed")
        sizes = {d: len(v) for d, v in self.data.items()}
        if state["sizes"] != sizes:
            raise ValueError(f"prompt data changed since the state was saved: {state['sizes']} != {sizes}")
        self.step = int(state["step"])
        self._credit = np.array(state["credit"], dtype=float)
        self._epoch = {d: int(v) for d, v in state["epoch"].items()}
        self._cursor = {d: int(v) for d, v in state["cursor"].items()}
