"""Start ``python -m <module> <args>`` as a process forked from run_distributed's preloaded server, for tests.

    from jtok_train.testing.commands import start_command

    p = start_command("jtok_train", ["model=tiny", ...], env=env, log=run / "rank0.log")
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL

The process is a new OS process (its own pid, killed for real by a signal, nothing of it survives a SIGKILL) that
runs the module exactly as ``python -m`` does (``runpy`` with ``__main__``, ``sys.argv``, the given environment
and working directory, stdout and stderr into ``log``, the interpreter's exit handlers at the end), but it skips
the interpreter start and the imports of torch, megatron.core and the training stack (7.5 s of the 8.5 s a
fresh ``python -m jtok_train`` takes on a 2-core machine before its first step): it is forked from the server
that already imported them (``distributed.PRELOAD``), one that never ran a test.

What it does not exercise is exactly that start: the interpreter, ``-m``'s module lookup and the imports. Tests
whose subject is that start (the command line's own tests, torchrun, the SLURM launchers, the resume tests that
stand for "the real command line") start fresh interpreters with ``subprocess``; docs/testing.md lists them.

The handle answers like ``subprocess.Popen``: ``pid``, ``poll()``, ``wait(timeout)`` (``subprocess
.TimeoutExpired`` when it runs past it), ``send_signal``, ``kill``; a process ended by signal N has exit code
-N, one that raised has 1, ``sys.exit(c)`` gives c, as for a fresh interpreter.
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from jtok_train.testing.distributed import _context

__all__ = ["CommandProcess", "start_command"]


class CommandProcess:
    """A started command (see the module docstring); ``args`` is the command line it stands for."""

    def __init__(self, proc: Any, args: list[str]):
        self._proc, self.args = proc, args

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_command(module: str, args: list[str], *, env: dict[str, str], log: str | Path,
                  cwd: str | Path | None = None) -> CommandProcess:
    """``python -m module *args`` with environment ``env`` (the whole of it, as ``subprocess`` takes it), its
    output appended to ``log``, in ``cwd`` (the caller's by default). A variable the preloaded modules read at
    import time that differs from the server's (``distributed.IMPORT_TIME_ENV``) makes it start with "spawn":
    a fresh interpreter, correct and as slow as ``subprocess``."""
    ctx = _context(env=env)
    argv = [f"-m {module}", *map(str, args)]
    proc = ctx.Process(target=_command_main, args=(module, list(map(str, args)), dict(env), str(log),
                                                   str(cwd or os.getcwd())),
                       name=f"command-{module}", daemon=False)    # not daemonic: the command starts processes
    proc.start()
    return CommandProcess(proc, argv)


def _command_main(module: str, args: list[str], env: dict[str, str], log: str, cwd: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    # lazy: child process (after the redirect: a spawned command's import-time warnings go to its log)
    import numpy as np
    import torch  # lazy: child process (as above; a forked one has both preloaded)

    torch.seed()             # a fresh interpreter's default RNG states, not the server's (random reseeds at fork)
    np.random.seed()
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        # a fresh interpreter runs its exit handlers (W&B, the writer's pools) after the module; multiprocessing
        # ends its child with os._exit, which would skip them
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
