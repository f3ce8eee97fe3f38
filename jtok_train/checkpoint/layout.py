"""Where checkpoints live in a run directory, which one is the latest, which one a run resumes from, and the
rotation that removes old ones::

    <run_dir>/checkpoints/step_0000100/           one complete checkpoint (torch_dist files + common.pt
        checksums.json                            + checksums.json, written after every rank finished)
    <run_dir>/checkpoints/step_0000200.partial/   a save in progress (or killed mid-save): never loaded
    <run_dir>/checkpoints/latest                  name of the newest complete checkpoint
    <run_dir>/checkpoints/REQUEUE                 written by a preempted run (see jtok_train/training/signals.py)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from jtok_train.config import RunConfig
from jtok_train.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "CHECKSUMS",
    "checkpoint_dir",
    "partial_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume_path",
    "cleanup",
]

FORMAT_VERSION = 1
CHECKSUMS = "checksums.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def partial_dir(final: Path) -> Path:
    """Where the save of checkpoint ``final`` writes until it is complete."""
    return final.with_name(final.name + ".partial")


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints (with checksums.json) of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / CHECKSUMS).is_file()]


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The checkpoint named by ``checkpoints/latest``; without a marker, the newest complete one."""
    marker = Path(run_dir) / "checkpoints" / LATEST
    if marker.is_file():
        path = marker.parent / marker.read_text().strip()
        if not path.is_dir():
            raise CheckpointError(f"{marker} names {path.name}, which does not exist: restore it or pass "
                                  f"train.resume_from=<a checkpoint directory>")
        return path
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def resolve_resume_path(cfg: RunConfig) -> Path | None:
    """train.resume_from (a checkpoint directory, or a run directory: its latest), else with
    train.auto_resume the latest checkpoint of train.run_dir, else None."""
    t = cfg.train
    if t.resume_from:
        p = Path(t.resume_from)
        if not p.exists():
            raise CheckpointError(f"train.resume_from={t.resume_from} does not exist")
        if (p / "checkpoints").is_dir():
            found = latest_checkpoint(p)
            if found is None:
                raise CheckpointError(f"train.resume_from={t.resume_from} is a run directory without a complete "
                                      "checkpoint")
            return found
        return p
    if t.auto_resume:
        return latest_checkpoint(t.run_dir)
    return None


def cleanup(root: Path, keep_last: int, keep: set[str]) -> None:
    """In ``<run_dir>/checkpoints``: remove stale ``.partial``/``.old`` directories and, with keep_last > 0,
    the complete checkpoints older than the newest ``keep_last`` (never one named in ``keep``)."""
    for p in root.iterdir():
        if p.is_dir() and p.name.endswith((".partial", ".old")):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        done = list_checkpoints(root.parent)
        for p in done[:-keep_last]:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
