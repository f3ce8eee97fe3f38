"""Reading and writing sharded state through Megatron-Core's dist_checkpointing: the synchronous torch_dist
save strategy, the safe sharded load, and the two context managers a load runs under. Every private or
version-dependent Megatron/torch name they need is reached through ``jtok_train.compat.megatron``.

Nothing here imports Megatron at module import time (checkpoint checks run before the heavy imports).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from jtok_train.compat import megatron as megatron_compat
from jtok_train.errors import CheckpointError

__all__ = ["save_strategy", "save_strategy_class", "load_sharded_state", "param_groups_in_order",
           "weights_only_objects"]


@functools.cache
def save_strategy_class() -> type:
    """torch_dist format written synchronously by torch.distributed.checkpoint's FileSystemWriter.

    Megatron's default torch_dist strategy goes through its async writer, which starts a multiprocessing
    "spawn" manager (~5 s on the first save, and it needs non-daemonic processes) and forks writer processes
    on every save; the plain writer runs in the calling thread and writes the same format (loaded by
    Megatron's default torch_dist load strategy).

    The common (non-tensor) state is always in ``common.pt`` (rank 0), whichever megatron-core writes it:
    on 0.19 this strategy does (see ``jtok_train.compat.megatron.pop_common_state``)."""
    # lazy: cost (torch.distributed.checkpoint, 0.5-1.5 s: not paid by importing checkpoint/)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save  # lazy: cost (as above)

    class SyncTorchDistSave(megatron_compat.torch_dist_save_strategy_class()):
        def make_writer(self, checkpoint_dir: str | Path) -> Any:
            """The storage writer of one save: one thread, every file fsynced."""
            return FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True)

        def save(self, sharded_state_dict, checkpoint_dir):
            ours, common = megatron_compat.pop_common_state(sharded_state_dict)
            if ours and dist.get_rank() == 0:
                torch.save(common, Path(checkpoint_dir) / "common.pt")
            sd = megatron_compat.sharded_keys_state_dict(sharded_state_dict, self.keep_only_main_replica)
            pyt = megatron_compat.to_pyt_state_dict(sd)
            dcp_save(pyt, storage_writer=self.make_writer(checkpoint_dir),
                     planner=megatron_compat.save_planner(self.keep_only_main_replica))

    return SyncTorchDistSave


def save_strategy() -> Any:
    """The sharded strategy every checkpoint save passes to ``dist_checkpointing.save``."""
    return save_strategy_class()("torch_dist", 1)


@contextmanager
def param_groups_in_order() -> Iterator[None]:
    """Megatron matches loaded parameter groups to the current ones by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr); two groups with equal keys (the token-table group has lr_mult 1 and its own max_lr; so
    has the scales' group of jtok.scale_lr_mult) collide there, in the optimizers' group filter and inside the
    distributed optimizer's load. The groups are saved in the optimizer's (deterministic) order, so when keys repeat, match
    them by position instead, checking each pair's keys."""
    keys = megatron_compat.param_group_identifier_keys()

    def ident(g):
        return tuple(g.get(k, g.get(f"pre_{k}")) for k in keys)

    def check(current_groups, state_dict_groups):
        if [ident(g) for g in current_groups] != [ident(g) for g in state_dict_groups]:
            raise CheckpointError("the checkpoint's optimizer parameter groups do not match this model's "
                                  f"({[ident(g) for g in state_dict_groups]} vs "
                                  f"{[ident(g) for g in current_groups]})")

    def filter_groups(original, current_groups, state_dict_groups):
        if len({ident(g) for g in current_groups}) == len(current_groups):
            return original(current_groups, state_dict_groups)
        check(current_groups, state_dict_groups)
        return list(state_dict_groups)

    # the distributed optimizer pairs the groups by the same keys in its own code: by position there too
    with megatron_compat.replace_param_group_matching(
            lambda original: lambda cur, saved: filter_groups(original, cur, saved)), \
            megatron_compat.distributed_optimizer_groups_by_position(check):
        yield


@contextmanager
def weights_only_objects() -> Iterator[None]:
    """During a load, read ShardedObjects (byte items, e.g. a layer's ``_extra_state``) with
    ``torch.load(weights_only=True)`` instead of torch.distributed.checkpoint's ``weights_only=False``."""

    def read_object(value, fqn):
        try:
            return torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint object {fqn} is not plain data "
                                  f"({type(e).__name__}): refused, loading runs no pickled code") from None

    with megatron_compat.replace_load_bytes(read_object):
        yield


def load_sharded_state(state: dict, path: Path | str, into: str) -> tuple[dict, set, set]:
    """dist_checkpointing.load with safe unpickling; any failure becomes one CheckpointError line.
    Returns (loaded state, keys in the checkpoint not asked for, keys asked for but absent)."""
    # lazy: cost (megatron.core, 4-6 s: checkpoint/ is imported before Megatron, to check a checkpoint first)
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling  # lazy: cost (as above)

    try:
        with weights_only_objects():
            return dist_checkpointing.load(state, str(path), strict=StrictHandling.RETURN_ALL)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a shape mismatch or an unreadable shard, in one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not load into {into}: {first}") from None
