"""Checkpoints through Megatron-Core's dist_checkpointing (sharded state dicts, ShardedTensors with global
offsets), so a checkpoint saved at one parallel layout / world size loads at another. Training
(``save_checkpoint``, ``load_checkpoint``) and inference (``read_meta``, ``read_dcp_metadata``,
``load_sharded_state``) use this package's public names only.

A save writes into ``step_N.partial``; when every rank has finished (barrier), the ranks hash the files,
rank 0 writes ``checksums.json``, renames the directory to ``step_N`` and only then replaces ``latest``
(write + rename). A crash at any point leaves the previous checkpoint complete and marked latest. Older
checkpoints beyond ``train.keep_last`` and stale ``.partial`` directories are removed after a save.

Modules: ``layout`` (paths, latest, resume path, rotation), ``integrity`` (checksums, durable writes, the
safe readers), ``fingerprint`` (data fingerprint, config comparison), ``state`` (what a checkpoint holds of a
trainer; pluggable components), ``rng`` (RNG states), ``megatron_io`` (the save strategy and the safe load).
Besides the sharded state, a checkpoint's ``meta`` (in ``common.pt``) holds the step, global consumed samples,
skipped steps, world size, the data fingerprint, the resolved config, the LR scheduler state, the optimizer
layout and the W&B run id.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from jtok_train.checkpoint import megatron_io
from jtok_train.checkpoint.fingerprint import (
    MODEL_SECTIONS,
    check_compatible,
    config_differences,
    data_fingerprint,
)
from jtok_train.checkpoint.integrity import (
    MetadataUnpickler,
    atomic_write,
    fsync_dir,
    read_dcp_metadata,
    read_meta,
    verify_checkpoint,
    write_checksums,
)
from jtok_train.checkpoint.layout import (
    CHECKSUMS,
    FORMAT_VERSION,
    checkpoint_dir,
    cleanup,
    latest_checkpoint,
    list_checkpoints,
    partial_dir,
    resolve_resume_path,
)
from jtok_train.checkpoint.megatron_io import load_sharded_state, param_groups_in_order, save_strategy
from jtok_train.checkpoint.rng import rng_sharded, rng_tensors, set_rng
from jtok_train.checkpoint.state import components, model_sections, optimizer_layout, trainer_state
from jtok_train.config import RunConfig
from jtok_train.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "MODEL_SECTIONS",
    "CHECKSUMS",
    "CheckpointError",
    "checkpoint_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume_path",
    "save_checkpoint",
    "load_checkpoint",
    "read_meta",
    "read_dcp_metadata",
    "MetadataUnpickler",
    "verify_checkpoint",
    "load_sharded_state",
    "save_strategy",
    "model_sections",
    "optimizer_layout",
    "check_compatible",
    "config_differences",
    "data_fingerprint",
]


def save_checkpoint(trainer: Any, step: int, consumed_samples: int | None = None,
                    extra_meta: dict | None = None) -> Path:
    """Save the trainer's full state at ``step`` (collective). Returns the final checkpoint directory."""
    # lazy: cost (megatron.core, 4-6 s: checkpoint/ is imported before Megatron, to check a checkpoint first)
    from megatron.core import dist_checkpointing

    cfg = trainer.cfg
    rank, world = dist.get_rank(), dist.get_world_size()
    final = checkpoint_dir(trainer.run_dir, step)
    partial = partial_dir(final)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (final.parent / "REQUEUE").unlink(missing_ok=True)
    dist.barrier()
    if consumed_samples is None:
        consumed_samples = step * cfg.train.global_batch_size
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "consumed_samples": int(consumed_samples),
        "world_size": world,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "data_fingerprint": getattr(trainer, "data_fingerprint", None),
        "scheduler": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                      for k, v in trainer.scheduler.state_dict().items()},
        "rng_names": sorted(rng_tensors()),
        "optimizer_layout": optimizer_layout(cfg),
        **(extra_meta or {}),
    }
    state = trainer_state(trainer, is_loading=False, rng=rng_sharded(rank, world, rng_tensors()))
    state["meta"] = meta
    # looked up on the module at each save: jtok_train.testing.faults wraps it for the crash tests
    dist_checkpointing.save(state, str(partial), sharded_strategy=megatron_io.save_strategy())
    dist.barrier()
    write_checksums(partial, rank, world)
    dist.barrier()
    if rank == 0:
        _publish(partial, final, keep_last=int(cfg.train.keep_last))
    dist.barrier()
    return final


def _publish(partial: Path, final: Path, keep_last: int) -> None:
    """Rename the finished ``partial`` to ``final``, then point ``latest`` at it and rotate (rank 0)."""
    if final.exists():   # re-saving a step (e.g. after resuming from an older checkpoint)
        trash = final.with_name(final.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    partial.rename(final)
    fsync_dir(final.parent)
    atomic_write(final.parent / "latest", final.name + "\n")
    cleanup(final.parent, keep_last=keep_last, keep={final.name})


def _check_optimizer_layout(path: Path, saved: dict, cfg: RunConfig) -> None:
    if saved["distributed"] != bool(cfg.parallel.use_distributed_optimizer):
        raise CheckpointError(f"checkpoint {path} holds the states of the "
                              f"{'distributed' if saved['distributed'] else 'plain'} optimizer: resume with "
                              f"parallel.use_distributed_optimizer={str(saved['distributed']).lower()}")
    now = optimizer_layout(cfg).get("model_parallel")
    was = saved.get("model_parallel")
    if not saved["distributed"] and was is not None and was[2] != now[2]:
        # measured on megatron-core 0.16.1: the plain optimizer's expert states, saved at one EP size, fail to
        # merge at another (apply_factory_merges: different dict keys); a PP change loads (tested)
        raise CheckpointError(f"checkpoint {path} holds the plain optimizer's states at expert-parallel size "
                              f"{was[2]}, which do not reshard to another: resume with "
                              f"parallel.expert_model_parallel_size={was[2]} (now {now[2]})")
    if saved.get("format") == "dp_reshardable" and was is not None and was != now:
        what = "TP/PP/EP/VPP" if max(len(was), len(now)) > 3 else "TP/PP/EP"
        raise CheckpointError(f"checkpoint {path} holds the distributed optimizer as dp_reshardable at {what} = "
                              f"{'/'.join(map(str, was))}, which reshards over data parallelism only: resume at "
                              f"{what} = {'/'.join(map(str, was))} (now {'/'.join(map(str, now))}), or save with "
                              "train.ckpt_optim_format=fully_reshardable")


def load_checkpoint(trainer: Any, path: Path | str) -> dict:
    """Load a checkpoint into the trainer's model, optimizer, scheduler, components and (at the same world
    size) RNG states. Collective. Returns the checkpoint's meta."""
    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    if trainer.cfg.train.verify_checksums:
        verify_checkpoint(path, rank, world)
    read_dcp_metadata(path)
    meta = read_meta(path)
    check_compatible(path, meta, trainer.cfg, getattr(trainer, "data_fingerprint", None))
    local_rng = rng_tensors()
    same_rng = meta["world_size"] == world and meta.get("rng_names") == sorted(local_rng)
    rng = rng_sharded(rank, world, local_rng) if same_rng else None
    saved_layout = meta.get("optimizer_layout", {"distributed": False, "format": None})
    _check_optimizer_layout(path, saved_layout, trainer.cfg)
    state = trainer_state(trainer, is_loading=True, rng=rng, layout=saved_layout)
    loaded, missing, unexpected = load_sharded_state(state, path, "this model")
    missing = sorted(k for k in missing if not k.startswith("rng."))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} key(s) this model needs ({missing[0]}, ...): "
                              "it is from a different model or parallel layout")
    # keys are "module.<name>" (Megatron's DDP adds "module."; Float16Module forwards its child's keys without
    # a prefix of its own), so fp32 and bf16 checkpoints share one layout: load into the unwrapped model
    # (whose parameters DDP and Float16Module share), a bf16 checkpoint into an fp32 model and back.
    chunks = getattr(trainer, "unwrapped_chunks", None) or [trainer.unwrapped]
    for v, chunk in enumerate(chunks):
        model_state = {}
        for k, val in loaded["model" if v == 0 else f"model_vp{v}"].items():
            if not k.startswith("module."):
                raise CheckpointError(f"checkpoint {path}: model key {k} lacks the module. prefix of jtok-train's "
                                      "training checkpoints")
            model_state[k[len("module."):]] = val
        chunk.load_state_dict(model_state, strict=True)
    with torch.no_grad(), param_groups_in_order():
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    for name, comp in components(trainer).items():
        comp.load_state_dict(loaded["extra"][name])
    # The LR schedule is a function of the consumed samples: take the position from the checkpoint and the
    # shape (peak, warmup, decay) from the current config, so train.train_iters may grow on resume.
    trainer.scheduler.num_steps = int(meta["scheduler"]["num_steps"])
    trainer.scheduler.step(0)
    if rng is not None:
        set_rng({k: v[0] for k, v in loaded["rng"].items()})
    return meta
