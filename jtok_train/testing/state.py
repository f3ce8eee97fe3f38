"""Layout-independent views of a trainer's state, for tests that compare runs at different world sizes,
parallel layouts, precisions or optimizers by their weights and optimizer states.

``global_state(trainer)`` (collective) returns on every rank ``{key: numpy array}`` with every tensor at its
global shape, assembled from all ranks' pieces by the global offsets of Megatron's sharded state dicts:

- ``model/<key>``: every model tensor (backbone, replicated JTok tables, the sharded table in its stored,
  permuted row order), in the dtype the model holds (bf16 as float32 values, exactly);
- ``optim/<state>/<key>``: Megatron's optimizer states per parameter (exp_avg, exp_avg_sq, and the fp32 main
  weights of a bf16 run), read through the ``fully_reshardable`` layout for the distributed optimizer (its
  per-parameter form, the same keys at any data-parallel size) and the plain layout otherwise;
- ``extra/<name>/<key>``: the checkpointed components (the sharded table's optimizer moments).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["global_state", "compare_states"]


def _pieces(sharded: Any, prefix: str) -> list[tuple[str, tuple, tuple, np.ndarray]]:
    # lazy: cost (torch + megatron.core, 5-8 s: the test process imports this module for compare_states)
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values  # lazy: cost (as above)
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories  # lazy: cost (as above)

    apply_factories(sharded)    # e.g. a GLU's fc1, stored as its two halves: without this it is skipped
    out = []
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or not torch.is_tensor(sh.data):
            continue
        if getattr(sh, "flattened_range", None) is not None:
            raise NotImplementedError(f"{sh.key}: flattened shard")
        pre = sh.prepend_axis_num
        index = tuple(int(o) for o in sh.global_offset[:pre]) + tuple(
            (int(o), int(o) + int(n)) for o, n in zip(sh.global_offset[pre:], sh.local_shape))
        data = sh.data.detach().float().cpu().reshape(sh.local_shape).numpy().copy()
        out.append((f"{prefix}{sh.key}", tuple(int(x) for x in sh.global_shape), index, data))
    return out


def global_state(trainer: Any) -> dict[str, np.ndarray]:
    import torch.distributed as dist  # lazy: cost (torch, 2-5 s: the test process imports this module without it)

    from jtok_train.checkpoint import model_sections  # lazy: cost (torch, as above)

    # every model chunk's pieces under model/ (their keys are global: chunks of interleaved stages fill
    # different layers of the same tensors)
    pieces = [p for sd in model_sections(trainer).values() for p in _pieces(sd, "model/")]
    sections = model_sections(trainer)     # fresh: _pieces builds the factories in place
    model_sd = sections["model"] if len(sections) == 1 else sections
    layout = {"chained_optim_avoid_prefix": True}
    if trainer.cfg.parallel.use_distributed_optimizer:
        layout["distrib_optim_sharding_type"] = "fully_reshardable"
    opt_sd = trainer.optimizer.sharded_state_dict(model_sd, metadata=layout)
    for _key, _shape, _index, _data in _pieces(opt_sd, ""):
        # "optimizer.state.exp_avg.module.decoder..." -> "optim/exp_avg/module.decoder..."
        rest = re.sub(r"^chained_\d+\.", "", _key)
        rest = rest[len("optimizer.state."):] if rest.startswith("optimizer.state.") else rest
        state, _, param = rest.partition(".")
        pieces.append((f"optim/{state}/{param}", _shape, _index, _data))
    # the optimizer's step count (torch AdamW keeps one per parameter: all must agree)
    steps = {float(st["step"]) for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
             for st in o.optimizer.state.values() if "step" in st}
    if len(steps) > 1:
        raise AssertionError(f"optimizer step differs between parameters: {sorted(steps)}")
    pieces.append(("optim/step/all", (1,), ((0, 1),), np.array([steps.pop() if steps else 0.0], np.float32)))
    for name, comp in trainer.checkpoint_components().items():
        # table_optimizer_vp1 holds other layers of table_optimizer's tensors
        pieces += _pieces(comp.sharded_state_dict(prefix=""), f"extra/{re.sub(r'_vp[0-9]+$', '', name)}/")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    full: dict[str, np.ndarray] = {}
    for rank_pieces in gathered:
        for key, shape, index, data in rank_pieces:
            arr = full.setdefault(key, np.full(shape, np.nan, dtype=np.float32))
            sl = tuple(i if isinstance(i, int) else slice(*i) for i in index)
            arr[sl] = data.reshape(arr[sl].shape)
    missing = [k for k, v in full.items() if np.isnan(v).any()]
    if missing:
        raise AssertionError(f"state not covered by the ranks' pieces (or NaN): {missing[:3]}")
    return full


def compare_states(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rel: float = 0.0,
                   prefixes: tuple[str, ...] = ("model/", "optim/", "extra/")) -> dict[str, float]:
    """Per-tensor relative difference ||a - b|| / ||a|| for every key under ``prefixes``; raises if the key
    sets differ or any difference exceeds ``rel`` (0: bitwise). Returns the differences."""
    ka = {k for k in a if k.startswith(prefixes)}
    kb = {k for k in b if k.startswith(prefixes)}
    if ka != kb:
        raise AssertionError(f"different state keys: only in a {sorted(ka - kb)[:3]}, only in b {sorted(kb - ka)[:3]}")
    diffs = {}
    for k in sorted(ka):
        if a[k].shape != b[k].shape:
            raise AssertionError(f"{k}: shape {a[k].shape} vs {b[k].shape}")
        if rel == 0.0:
            diffs[k] = 0.0 if np.array_equal(a[k], b[k]) else float("inf")
        else:
            norm = float(np.linalg.norm(a[k].astype(np.float64)))
            diffs[k] = float(np.linalg.norm((a[k].astype(np.float64) - b[k]))) / max(norm, 1e-30)
    worst = max(diffs, key=diffs.get) if diffs else None
    if worst is not None and diffs[worst] > rel:
        raise AssertionError(f"{worst}: relative difference {diffs[worst]:.3g} > {rel:g}")
    return diffs
