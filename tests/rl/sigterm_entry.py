"""`python -m torch.distributed.run ... -m tests.rl.sigterm_entry CONFIG [overrides]`: mgs-train whose rank
MGS_TEST_SIGTERM_RANK receives SIGTERM while it generates step MGS_TEST_SIGTERM_STEP (1-based): a preemption that
lands inside the rollout phase, deterministically (tests/rl/test_end_to_end.py)."""

import os
import signal
import sys

from mgs_megatron.rollout import backends


def _patch() -> None:
    at, rank = int(os.environ["MGS_TEST_SIGTERM_STEP"]), int(os.environ.get("MGS_TEST_SIGTERM_RANK", "0"))
    generate = backends.MegatronBackend.generate

    def generate_then_signal(self, prompts, n, *, step, temperature=None):
        out = generate(self, prompts, n, step=step, temperature=temperature)
        if step + 1 == at and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    backends.MegatronBackend.generate = generate_then_signal


if __name__ == "__main__":
    _patch()
    from mgs_megatron.rl.cli import main

    sys.exit(main())
