"""Checkpoints through Megatron-Core's dist_checkpointing (sharded state dicts with global offsets,
so a checkpoint can be loaded at another parallel layout).

Layout: ``<run_dir>/checkpoints/step_0000100/`` holds one checkpoint; ``latest`` (a text file with
the directory name) is written by rank 0 only after every rank finished saving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

__all__ = ["save_checkpoint", "checkpoint_dir", "latest_checkpoint"]


def checkpoint_dir(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    marker = Path(run_dir) / "checkpoints" / "latest"
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(trainer: Any, step: int) -> Path:
    from megatron.core import dist_checkpointing

    path = checkpoint_dir(trainer.run_dir, step)
    if trainer.rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_sd = trainer.model.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd),
        "scheduler": trainer.scheduler.state_dict(),
        "step": step,
        "consumed_samples": step * trainer.cfg.train.global_batch_size,
        "config": OmegaConf.to_yaml(trainer.cfg, resolve=True),
    }
    dist_checkpointing.save(state, str(path))
    dist.barrier()
    if trainer.rank == 0:
        tmp = path.parent / "latest.tmp"
        tmp.write_text(path.name + "\n")
        tmp.replace(path.parent / "latest")
    return path
