"""Greedy validation on held-out prompts: val/<domain>/reward (and val/<domain>/acc where full marks mean correct,
val/<domain>/failed when a reward call failed or timed out), at step 0, every run.val_every steps and at the last
step (run.val_every 0: only those two)."""

from __future__ import annotations

from mgs_megatron.rewards import OK
from mgs_megatron.rl.metrics import accuracy
from mgs_megatron.rl.scoring import score_rollouts

_VAL_STEP_OFFSET = 10 ** 6  # validation requests draw seeds apart from training steps' (greedy anyway)


class Validator:
    """Args:
        prompts: {domain: [PromptSample]} held out for validation (empty lists: that domain is not validated).
        domains: the domains, in reporting order.
        val_every: validate every N steps (0: only at step 0 and at the last step).
        total_steps: the run's last step.
    """

    def __init__(self, prompts: dict, domains, *, val_every: int, total_steps: int):
        self.prompts = [p for d in domains for p in prompts.get(d, [])]
        self.domains, self.val_every, self.total_steps = list(domains), val_every, total_steps

    def due(self, step: int) -> bool:
        if not self.prompts:
            return False
        return step in (0, self.total_steps) or bool(self.val_every and step % self.val_every == 0)

    def run(self, backend, rewards, step: int) -> dict:
        """Greedy responses of the rollout backend, scored per domain (every rank calls it)."""
        rollouts = backend.generate([p.as_messages() for p in self.prompts], 1, step=_VAL_STEP_OFFSET + step,
                                    temperature=0.0)
        scored = score_rollouts(rewards, self.prompts, rollouts)
        out = {}
        for d in self.domains:
            mine = [o for o, dom in zip(scored.outcomes, scored.domains) if dom == d]
            if mine:
                scores = [o.score for o in mine]
                out[f"val/{d}/reward"] = sum(scores) / len(scores)
                threshold = rewards.accuracy_threshold(d)
                if threshold is not None:
                    out[f"val/{d}/acc"] = accuracy(scores, threshold)
                failed = sum(o.status != OK for o in mine)
                if failed:
                    out[f"val/{d}/failed"] = float(failed)
        return out


__all__ = ["Validator"]
