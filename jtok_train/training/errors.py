"""Errors a user can act on. Each message is one line that names the problem and the fix; the CLI prints
it without a traceback and exits with ``exit_code``."""

from __future__ import annotations

__all__ = ["RunError", "CheckpointError", "NonFiniteLossError"]


class RunError(RuntimeError):
    """A run stopped on bad input or a failed check; nothing saved was lost."""

    exit_code = 3


class CheckpointError(RunError):
    """A checkpoint is incomplete, corrupted, unsafe, or from a different model or data."""


class NonFiniteLossError(RunError, FloatingPointError):
    """The loss became NaN/Inf (train.nan_policy=stop); the last good step was saved."""
