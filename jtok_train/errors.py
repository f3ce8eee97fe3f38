"""Errors a user can act on. Each message is one line that names the problem and the fix; the commands print
it without a traceback and exit with ``exit_code``.

The bottom room of the package (README, Layout): it imports nothing of jtok_train, and every room may raise
these (config errors are :class:`jtok_train.config.ConfigError`, data file errors
:class:`jtok_train.data.indexed.DataFileError`: each next to the checks that raise it)."""

from __future__ import annotations

__all__ = ["RunError", "CheckpointError", "NonFiniteLossError", "UsageError"]


class RunError(RuntimeError):
    """A run stopped on bad input or a failed check; nothing saved was lost."""

    exit_code = 3


class CheckpointError(RunError):
    """A checkpoint is incomplete, corrupted, unsafe, or from a different model or data."""


class NonFiniteLossError(RunError, FloatingPointError):
    """The loss became NaN/Inf (train.nan_policy=stop); the last good step was saved."""


class UsageError(ValueError):
    """A bad key or value on a command line (jtok-generate, jtok-eval, jtok-export); the command exits with 2."""

    exit_code = 2
