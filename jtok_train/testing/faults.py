"""Fault injection for the crash tests, outside the production code path.

``python -m jtok_train.testing.faults <jtok-train args>`` is ``python -m jtok_train <jtok-train args>`` with the
faults the environment names installed first (the production entry points read none of these variables):

- ``JTOK_FAULT_KILL_IN_WRITE=<step>[:<rank>]``: SIGKILL the rank (every rank without ``:<rank>``) inside
  torch.distributed.checkpoint's file writer, ``KILL_AFTER_BYTES`` bytes into its first shard file of the
  step-``<step>`` checkpoint;
- ``JTOK_FAULT_KILL_IN_SAVE=<step>``: SIGKILL every rank once it has written its torch_dist files of the
  step-``<step>`` checkpoint (before the checksums, the rename and ``latest``).

Both wrap the checkpoint save strategy (``jtok_train.checkpoint.megatron_io.save_strategy``, which
``save_checkpoint`` looks up at each save). Before a kill, the rank prints ``FAULT_MARK ...`` on stderr, so a
test can tell the injected kill from any other death.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["KILL_IN_WRITE", "KILL_IN_SAVE", "KILL_AFTER_BYTES", "FAULT_MARK", "faults_from_env", "install", "main"]

KILL_IN_WRITE = "JTOK_FAULT_KILL_IN_WRITE"
KILL_IN_SAVE = "JTOK_FAULT_KILL_IN_SAVE"
KILL_AFTER_BYTES = 4096
FAULT_MARK = "jtok_train.testing.faults: SIGKILL"
_PARTIAL_RE = re.compile(r"^step_(\d+)\.partial$")


def faults_from_env(env: dict[str, str] | None = None) -> dict[str, tuple[int, int | None]]:
    """{"write": (step, rank or None), "save": (step, None)} for the variables that are set."""
    env = os.environ if env is None else env
    out: dict[str, tuple[int, int | None]] = {}
    try:
        if env.get(KILL_IN_WRITE):
            step, _, rank = env[KILL_IN_WRITE].partition(":")
            out["write"] = (int(step), int(rank) if rank else None)
        if env.get(KILL_IN_SAVE):
            out["save"] = (int(env[KILL_IN_SAVE]), None)
    except ValueError:
        raise SystemExit(f"jtok_train.testing.faults: {KILL_IN_WRITE}=<step>[:<rank>], {KILL_IN_SAVE}=<step> "
                         f"(got {env.get(KILL_IN_WRITE)!r}, {env.get(KILL_IN_SAVE)!r})") from None
    return out


def _hits(fault: tuple[int, int | None] | None, checkpoint_dir: Any) -> bool:
    import torch.distributed as dist  # lazy: cost (torch, 2-5 s: tests import this module for its constants)

    m = _PARTIAL_RE.match(Path(checkpoint_dir).name)
    if fault is None or m is None or int(m.group(1)) != fault[0]:
        return False
    return fault[1] is None or fault[1] == dist.get_rank()


def _kill(what: str) -> None:
    print(f"{FAULT_MARK} {what}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_while_writing(writer: Any, after_bytes: int, what: str) -> None:
    """SIGKILL this rank ``after_bytes`` bytes into the first shard file ``writer`` writes (the bytes before
    it are flushed and fsynced, so the file is left exactly that long)."""
    create = writer.fs.create_stream

    class Killing:
        def __init__(self, stream):
            self.stream, self.written = stream, 0

        def write(self, data):
            n = len(memoryview(data).cast("B"))
            if self.written + n > after_bytes:
                self.stream.write(memoryview(data).cast("B")[: max(0, after_bytes - self.written)])
                self.stream.flush()
                os.fsync(self.stream.fileno())
                _kill(what)
            self.written += n
            return self.stream.write(data)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    @contextmanager
    def create_stream(path, mode):
        with create(path, mode) as stream:
            yield Killing(stream) if str(path).endswith(".distcp") and "w" in mode else stream

    writer.fs.create_stream = create_stream


def install(faults: dict[str, tuple[int, int | None]]) -> None:
    """Wrap the checkpoint save strategy so the saves ``faults`` names are killed (see the module docstring)."""
    if not faults:
        return
    from jtok_train.checkpoint import megatron_io  # lazy: cost (torch, 2-5 s: tests import the constants)

    base = megatron_io.save_strategy_class

    def faulty_strategy():
        class FaultySave(base()):
            def make_writer(self, checkpoint_dir):
                writer = super().make_writer(checkpoint_dir)
                if _hits(faults.get("write"), checkpoint_dir):
                    _kill_while_writing(writer, KILL_AFTER_BYTES,
                                        f"{KILL_AFTER_BYTES} bytes into a shard file of {Path(checkpoint_dir).name}")
                return writer

            def save(self, sharded_state_dict, checkpoint_dir):
                super().save(sharded_state_dict, checkpoint_dir)
                if _hits(faults.get("save"), checkpoint_dir):
                    _kill(f"after writing the torch_dist files of {Path(checkpoint_dir).name}")

        return FaultySave("torch_dist", 1)

    megatron_io.save_strategy = faulty_strategy


def main() -> None:
    """Install the environment's faults, then run jtok-train's command line (``sys.argv[1:]``)."""
    install(faults_from_env())
    from jtok_train.cli.train import main as train_main  # lazy: cost (hydra, 0.3-0.6 s: tests import the constants)

    train_main()


if __name__ == "__main__":   # like jtok_train/__main__.py: keep the guard
    main()
