"""The errors a user can act on, shared by every layer (so the CLI catches one type per kind of mistake)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad or unsupported configuration: a YAML key, an HF config field, a parallel layout or an option. The
    message names the key, field or option at fault."""


class ConversionError(ValueError):
    """Weights that do not fit the model: a missing or unexpected tensor, or a shape mismatch. The message names
    the tensor (and the file where one is involved)."""


class RewardError(RuntimeError):
    """A domain's reward failed (raised, returned a non-finite score or timed out) on every item for
    rewards.max_failed_steps consecutive steps; the message carries the reward's own error."""


class CheckpointError(RuntimeError):
    """No usable checkpoint where one is needed (every one is damaged, or written at another world size); the
    message names the files."""


__all__ = ["CheckpointError", "ConfigError", "ConversionError", "RewardError"]
