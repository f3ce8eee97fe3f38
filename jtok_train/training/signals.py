"""Preemption: SIGTERM and SIGUSR1 only set a flag; the trainer checks it after every step, all ranks agree
on it (a MAX all-reduce: one rank's signal stops everyone), save a checkpoint and exit with
``REQUEUE_EXIT_CODE``.

REQUEUE_EXIT_CODE = 75 (EX_TEMPFAIL in sysexits.h, "temporary failure, retry"): the run was stopped on
purpose after a complete checkpoint, so a batch script should requeue the job (``scontrol requeue
$SLURM_JOB_ID``); on restart the trainer resumes from ``<run_dir>/checkpoints/latest``. Any other non-zero code
is a real failure. Under torchrun the launcher reports a failed worker with its own code, so the trainer also
writes ``<run_dir>/checkpoints/REQUEUE`` (removed when the run starts again): scripts can test for that file.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["REQUEUE_EXIT_CODE", "PREEMPT_SIGNALS", "Preempted", "PreemptionFlag"]

REQUEUE_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by Trainer.fit after the preemption checkpoint was saved; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message


class PreemptionFlag:
    """Installs the handlers (main thread only) and answers, collectively, whether any rank was signalled."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:  # only sets the flag: no work inside a handler
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank when any rank received a preemption signal (collective: call on all ranks)."""
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
