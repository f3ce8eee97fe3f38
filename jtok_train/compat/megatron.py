"""Megatron-Core behaviour this project corrects or depends on, in one place (version ranges per entry).

jtok_train supports megatron-core 0.16.1 to 0.19.2 (``megatron-core>=0.16.1,<=0.19.2``, what CI tests). Every
version-dependent or private Megatron-Core name the project uses outside the CPU bridge lives here, each entry
with the megatron-core versions it was checked on and the upstream code or change it tracks; any choice
between versions is made in this module only, the callers see one behaviour. Unlike ``compat/cpu.py``
nothing here is about the CPU: these apply on every device.

Nothing here imports Megatron at module import time (checkpoint checks run before the heavy imports): each
entry imports what it needs when called.

Longer than 400 lines: it is the one place of Megatron-Core's private and version-dependent names (the
project's rule), so it grows with them; each entry names the versions it was checked on.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from importlib import metadata
from typing import Any, Callable, Iterator

import torch
from packaging.version import Version

import jtok_train

__all__ = [
    "apply_megatron_fixes",
    "pop_common_state",
    "torch_dist_save_strategy_class",
    "sharded_keys_state_dict",
    "to_pyt_state_dict",
    "save_planner",
    "replace_load_bytes",
    "param_group_identifier_keys",
    "replace_param_group_matching",
    "distributed_optimizer_groups_by_position",
    "allocate_distributed_optimizer_state",
    "attach_aux_loss",
    "per_token_aux_loss_factor",
    "set_aux_loss_scale",
    "record_aux_loss",
    "report_aux_losses",
    "clear_aux_losses",
    "recorded_aux_losses",
    "TESTED_MEGATRON",
    "versions",
    "warn_if_untested",
]

# -- fixes applied once, when Megatron's parallel state is set up (apply_megatron_fixes) ----------------
_APPLIED = False


def _fix_checkpoint_without_output_fp8() -> None:
    """``tensor_parallel.CheckpointWithoutOutput(fp8=False)`` sets ``self.fp8 = fp8 is not None`` (True), so its
    forward asks Transformer Engine's FP8GlobalStateManager whether FP8 is on; without Transformer Engine
    that name is undefined and the selective recompute of ``layernorm`` (and MoE's ``moe_act``) fails with a
    NameError. Without TE there is no FP8: force the flag off. Checked on megatron-core 0.16.1 and 0.19.2
    (tensor_parallel/random.py, CheckpointWithoutOutput.__init__: the same line in both); a no-op where TE is installed."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.tensor_parallel import random as mrandom

    cls = getattr(mrandom, "CheckpointWithoutOutput", None)
    if cls is None or getattr(mrandom, "HAVE_TE", True) or getattr(cls, "_jtok_fp8_fixed", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.fp8 = False

    cls.__init__ = __init__
    cls._jtok_fp8_fixed = True


def _fix_fully_reshardable_load_without_apex() -> None:
    """``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` copies every entry of the torch
    optimizer's per-parameter state from the checkpoint; without Apex/Transformer Engine (torch's AdamW) that
    state holds ``step``, which the fully_reshardable layout does not store (the step travels in the param
    groups and ``load_state_dict`` has already set it), so the load fails with KeyError 'step'. Keep the step
    that was just set. Checked on megatron-core 0.16.1 and 0.19.2 (optimizer/distrib_optimizer.py,
    _set_main_param_and_optimizer_states, unchanged); a no-op with Apex/TE."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.optimizer import distrib_optimizer as mdo

    cls = mdo.DistributedOptimizer
    if getattr(mdo, "HAVE_APEX_OR_TE", True) or getattr(cls, "_jtok_step_fixed", False) \
            or not hasattr(cls, "_set_main_param_and_optimizer_states"):
        return
    original = cls._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state.get(main_param, {})
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls._jtok_step_fixed = True


def _fix_shared_step_after_load_without_apex() -> None:
    """Without Apex/Transformer Engine, ``DistributedOptimizer.load_state_dict`` gives every parameter's torch
    AdamW state one and the same ``step`` tensor (``s["step"] = step`` in a loop; torch's load keeps a step
    tensor as it is). torch's AdamW increments ``state["step"]`` in place per parameter, so after a resume the
    shared step advanced once per parameter per iteration and the bias correction went wrong: the resumed run
    left the uninterrupted one. And with the dp_reshardable layout the per-bucket ``step`` entries are
    LocalNonpersistentObjects, so the parameter-state load then copies the *current* (fresh: 0) step over it.
    The checkpoint's step is in the loaded param groups: give each parameter its own tensor of it. Checked on
    megatron-core 0.16.1 and 0.19.2 (optimizer/distrib_optimizer.py, load_state_dict and
    load_parameter_state_from_dp_reshardable, the same code); a no-op with Apex/TE (the step lives in the groups)."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.optimizer import distrib_optimizer as mdo

    cls = mdo.DistributedOptimizer
    if getattr(mdo, "HAVE_APEX_OR_TE", True) or getattr(cls, "_jtok_unshared_step", False):
        return
    original = cls.load_state_dict

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        for group in self.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)

    cls.load_state_dict = load_state_dict
    cls._jtok_unshared_step = True


def apply_megatron_fixes() -> None:
    """Idempotent; called when Megatron's parallel state is set up (compat.init_model_parallel)."""
    global _APPLIED
    if _APPLIED:
        return
    _fix_checkpoint_without_output_fp8()
    _fix_fully_reshardable_load_without_apex()
    _fix_shared_step_after_load_without_apex()
    _APPLIED = True


# -- dist_checkpointing: where the common (non-tensor) state goes on save ---------------------------------
# Checked on 0.16.1 and 0.19.2.
# <= 0.18: dist_checkpointing.save() writes the common state itself, to <dir>/common.pt on rank 0, before it
#   calls the sharded strategy (TorchCommonSaveStrategy.save_common).
# >= 0.19.0 (upstream PR #5160 "deprecate common strategy"): save() writes no common.pt; it adds the common
#   state to the sharded state dict as ShardedObject(key="common_state", replica_id=<rank>) and lets the
#   sharded strategy store it inside the torch_dist files. load() still reads a legacy common.pt when one
#   exists (serialization._legacy_common_state_exists), so a strategy that takes the entry back out and
#   writes common.pt itself keeps the same on-disk format on both versions.
_COMMON_STATE_KEY = "common_state"


def pop_common_state(sharded_state_dict: dict) -> tuple[bool, Any]:
    """Take the common state that ``dist_checkpointing.save`` handed to the sharded strategy out of
    ``sharded_state_dict``: ``(True, state)`` on >= 0.19 (the strategy must write it), ``(False, None)`` on
    <= 0.18 (Megatron already wrote common.pt)."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    entry = sharded_state_dict.get(_COMMON_STATE_KEY)
    if isinstance(entry, ShardedObject) and entry.key == _COMMON_STATE_KEY:
        del sharded_state_dict[_COMMON_STATE_KEY]
        return True, entry.data
    return False, None


# -- dist_checkpointing: the torch_dist save path, written synchronously ---------------------------------
# Checked on 0.16.1 and 0.19.2: the same names and signatures on both.
# TorchDistSaveShardedStrategy: 0.16 subclasses strategies.base.AsyncSaveShardedStrategy; 0.19 removed
#   strategies/base.py (upstream PR #5134 "remove deprecated modules from core/dist_checkpointing") and the
#   class stands alone; save() only accepts an instance of it (or FullyParallelSaveStrategyWrapper) as
#   sharded_strategy. Constructor (backend, version, keep_only_main_replica=True, ...) on both.
def torch_dist_save_strategy_class() -> type:
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy


# strategies.torch._replace_state_dict_keys_with_sharded_keys (private): (sharded_state_dict,
#   keep_only_main_replica) -> (flat dict of key -> [ShardedBase], flat_mapping, rename_mapping), on both.
def sharded_keys_state_dict(sharded_state_dict: dict, keep_only_main_replica: bool) -> dict:
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.dist_checkpointing.strategies.torch import _replace_state_dict_keys_with_sharded_keys

    flat, _flat_mapping, _rename_mapping = _replace_state_dict_keys_with_sharded_keys(
        sharded_state_dict, keep_only_main_replica)
    return flat


# strategies.torch.mcore_to_pyt_state_dict (not in __all__): (flat state dict, is_loading) -> the
#   torch.distributed.checkpoint state dict (ShardedTensors, BytesIO for ShardedObjects), on both.
def to_pyt_state_dict(flat_state_dict: dict) -> dict:
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.dist_checkpointing.strategies.torch import mcore_to_pyt_state_dict

    return mcore_to_pyt_state_dict(flat_state_dict, False)


# strategies.torch.MCoreSavePlanner: dedup_replicated_tensors= / flatten_state_dict= on both (0.19 also passes
#   flatten_sharded_tensors=False, a speed-up for nested ShardedTensors we do not have).
def save_planner(keep_only_main_replica: bool) -> Any:
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    return MCoreSavePlanner(dedup_replicated_tensors=not keep_only_main_replica, flatten_state_dict=False)


# -- dist_checkpointing: how byte objects (ShardedObjects) are read on load ------------------------------
# Checked on 0.16.1 and 0.19.2: strategies.torch.MCoreLoadPlanner defines no load_bytes on either; it inherits
#   torch.distributed.checkpoint's DefaultLoadPlanner.load_bytes(read_item, value), which unpickles with
#   weights_only=False. Replacing it on MCoreLoadPlanner (the planner TorchDistLoadShardedStrategy.load
#   builds) changes only Megatron's loads.
@contextlib.contextmanager
def replace_load_bytes(read_object: Callable[[Any, Any], Any]) -> Iterator[None]:
    """Within the block, byte objects of Megatron's loads are read by ``read_object(value, fqn)`` (a byte stream
    and the object's name; it returns the object) and stored where DefaultLoadPlanner.load_bytes stores them
    (torch 2.13: into ``original_state_dict`` through ``planner.mappings`` with the private
    ``torch.distributed.checkpoint._traverse.set_element`` when the planner flattened the state dict, else
    into ``planner.state_dict``)."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner

    def load_bytes(planner, read_item, value):
        fqn = read_item.dest_index.fqn
        obj = read_object(value, fqn)
        if planner.flatten_state_dict:
            # lazy: cost (torch.distributed.checkpoint, 0.5-1.5 s; loaded by then, in a load)
            from torch.distributed.checkpoint._traverse import set_element

            set_element(planner.original_state_dict, planner.mappings[fqn], obj)
        else:
            planner.state_dict[fqn] = obj

    had = "load_bytes" in MCoreLoadPlanner.__dict__
    old = MCoreLoadPlanner.__dict__.get("load_bytes")
    MCoreLoadPlanner.load_bytes = load_bytes
    try:
        yield
    finally:
        if had:
            MCoreLoadPlanner.load_bytes = old
        else:
            del MCoreLoadPlanner.load_bytes


# -- optimizer: matching loaded parameter groups to the current ones -------------------------------------
# optimizer.param_group_identifier_keys (module constant, not API):
#   0.16.1: ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr");
#   0.19.2: the ParamGroupOverride keys (max_lr, min_lr, start_wd, end_wd, wd_mult, optimizer, ...) + lr_mult,
#   is_expert_parallel, is_decoupled_lr (upstream PR #4705, groups with different min/max LRs no longer
#   collide). A key a group lacks counts as None on 0.19 (and its "pre_<key>" alias on both).
_PARAM_GROUP_KEYS_0_16 = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def param_group_identifier_keys() -> tuple[str, ...]:
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.optimizer import optimizer as mopt

    return tuple(getattr(mopt, "param_group_identifier_keys", _PARAM_GROUP_KEYS_0_16))


# MegatronOptimizer._filter_and_reorder_param_groups (private staticmethod (current_groups, state_dict_groups)
#   -> groups): called by the optimizers' load_state_dict to pair saved groups with the current ones by
#   param_group_identifier_keys; checked on 0.16.1 and 0.19.2 (same signature).
@contextlib.contextmanager
def replace_param_group_matching(
        make: Callable[[Callable[[list, list], list]], Callable[[list, list], list]]) -> Iterator[None]:
    """Within the block, the groups are matched by ``make(original)``, a function of
    ``(current_groups, state_dict_groups)``; ``original`` is Megatron's."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    old = MegatronOptimizer.__dict__["_filter_and_reorder_param_groups"]
    MegatronOptimizer._filter_and_reorder_param_groups = staticmethod(make(old.__func__))
    try:
        yield
    finally:
        MegatronOptimizer._filter_and_reorder_param_groups = old


# DistributedOptimizer.load_state_dict (checked on 0.16.1 and 0.19.2: optimizer/distrib_optimizer.py) pairs the
#   saved parameter groups with the current ones through a dict keyed by the identifier keys, read from the module
#   global ``param_group_identifier_keys`` it imported: groups with equal keys collapse onto one saved group, and its
#   hyperparameters (max_lr, min_lr) go to both. On 0.16.1 the keys are (wd_mult, lr_mult, ...), so a group with
#   its own max_lr (the scales' with jtok.scale_lr_mult, the replicated table's with jtok.lr_mult) collides with the
#   group of the same weight decay. Within the block, when the keys repeat, a position key is added to the keys
#   and to both sides' groups (the groups are built in one deterministic order), and removed after the load.
_POSITION_KEY = "_jtok_group_position"


@contextlib.contextmanager
def distributed_optimizer_groups_by_position(check: Callable[[list, list], None]) -> Iterator[None]:
    """``check(current_groups, saved_groups)`` runs first when keys repeat (raise there on a mismatch)."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.optimizer import distrib_optimizer as dmod

    cls = dmod.DistributedOptimizer
    original = cls.__dict__.get("load_state_dict")
    if original is None or not hasattr(dmod, "param_group_identifier_keys"):   # another layout: Megatron's own
        yield
        return
    keys = tuple(dmod.param_group_identifier_keys)

    def ident(g):
        return tuple(g.get(k, g.get(f"pre_{k}")) for k in keys)

    def load_state_dict(self, state_dict):
        saved = (state_dict.get("optimizer") or {}).get("param_groups") if isinstance(state_dict, dict) else None
        current = self.optimizer.param_groups
        if not saved or len({ident(g) for g in current}) == len(current):
            return original(self, state_dict)
        check(current, saved)
        for i, g in enumerate(saved):
            g[_POSITION_KEY] = i
        for i, g in enumerate(current):
            g[_POSITION_KEY] = i
        dmod.param_group_identifier_keys = keys + (_POSITION_KEY,)
        try:
            return original(self, state_dict)
        finally:
            dmod.param_group_identifier_keys = keys
            for g in self.optimizer.param_groups:
                g.pop(_POSITION_KEY, None)
            for g in saved:
                g.pop(_POSITION_KEY, None)

    cls.load_state_dict = load_state_dict
    try:
        yield
    finally:
        cls.load_state_dict = original


def allocate_distributed_optimizer_state(optimizer: Any) -> None:
    """Give a fresh DistributedOptimizer's torch optimizer its states (zeros, step 0) before a load.

    Without Apex/Transformer Engine (the CPU path), ``DistributedOptimizer.state_dict()`` reads the step from
    the torch optimizer's per-parameter states, which exist only after a first step, and
    ``sharded_state_dict(is_loading=True)`` calls it first (checked on megatron-core 0.16.1 and 0.19.2:
    optimizer/distrib_optimizer.py, state_dict). The states are overwritten by the load."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
                inner.state[p]["step"] = torch.zeros((), dtype=torch.float32)


# -- MoE auxiliary losses: how they are attached, recorded and reported ------------------------------------
# JTok-M's load-balancing loss joins Megatron's MoE aux-loss mechanism, so it is scaled, logged and averaged the
# way the installed Megatron treats its router's aux losses (router.py, TopKRouter.attach_and_log_load_balancing_loss
# and the tracker it records into).


def _moe_metrics_tracker() -> Any | None:
    """0.19 (moe_logging.get_moe_metrics_tracker; save_to_aux_losses_tracker and friends are deprecated wrappers
    of it since 0.16 and slated for removal) or None on 0.16.1, whose tracker is moe_utils' legacy dict."""
    try:
        # lazy: version (moe_logging: 0.19 has it, 0.16.1 does not)
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


_PER_TOKEN_TP_CP: bool | None = None


def per_token_aux_loss_factor(num_local_tokens: int, tp_cp_size: int) -> int:
    """What the router multiplies an aux loss by under ``calculate_per_token_loss`` (finalize_model_grads then
    divides every gradient by the global token count). 0.16.1: the local token count. 0.19.2: local tokens x
    the TP*CP group size (sequence-parallel shards sum their router gradients over TP, which 0.16.1's factor
    left out). Decided from the installed router's source, falling back to the version (>= 0.19)."""
    global _PER_TOKEN_TP_CP
    if _PER_TOKEN_TP_CP is None:
        # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
        from megatron.core.transformer.moe.router import TopKRouter

        try:
            src = inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)
            _PER_TOKEN_TP_CP = "tp_cp_group.size()" in src
        except (OSError, TypeError, AttributeError):
            _PER_TOKEN_TP_CP = Version(versions()["megatron-core"]).release[:2] >= (0, 19)
    return num_local_tokens * (tp_cp_size if _PER_TOKEN_TP_CP else 1)


def attach_aux_loss(activation: torch.Tensor, aux_loss: torch.Tensor, *, per_token_loss: bool,
                    num_local_tokens: int, tp_cp_size: int) -> torch.Tensor:
    """``activation`` carrying ``aux_loss``'s gradient (MoEAuxLossAutoScaler: its backward adds d aux_loss x the
    scale the schedule sets, 1/num_microbatches), scaled like the installed router's aux loss."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    if per_token_loss:
        aux_loss = aux_loss * per_token_aux_loss_factor(num_local_tokens, tp_cp_size)
    return MoEAuxLossAutoScaler.apply(activation, aux_loss)


def set_aux_loss_scale(scale: torch.Tensor) -> None:
    """The aux-loss gradient scale (Megatron's schedule sets it for MoE backbones only)."""
    # lazy: cost (megatron.core, 4-6 s: this module imports none at load, see its docstring)
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(scale)


def record_aux_loss(name: str, value: torch.Tensor, layer_number: int, num_layers: int,
                    reduce_group: Any = None) -> None:
    """Record a layer's aux-loss value for logging, as the router does (value = loss / coeff; summed over
    ``reduce_group``, then averaged over data parallel when reported)."""
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        tracker.record(name, value.detach(), layer_number, num_layers, reduce_group=reduce_group)
    else:
        # lazy: version (0.16.1's legacy tracker; deprecated wrappers on 0.19)
        from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

        save_to_aux_losses_tracker(name, value.detach(), layer_number, num_layers, reduce_group=reduce_group)


def report_aux_losses(loss_scale: float, iteration: int, num_layers: int) -> dict[str, float]:
    """Reduce the recorded aux losses over the ranks, aggregate them as Megatron's training log does (each
    name: the sum over layers and micro-batches x loss_scale / num_layers), clear them; {name: value}. A
    collective: every rank calls it. 0.19: MoEMetricsTracker.report; 0.16.1: moe_utils.track_moe_metrics."""
    out: dict[str, Any] = {}
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        if tracker.metrics:
            tracker.report(loss_scale=loss_scale, iteration=iteration, total_loss_dict=out, num_layers=num_layers)
    else:
        # lazy: version (0.16.1's legacy tracker; deprecated wrappers on 0.19)
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, track_moe_metrics

        if get_moe_layer_wise_logging_tracker():
            track_moe_metrics(loss_scale=loss_scale, iteration=iteration, total_loss_dict=out, num_layers=num_layers)
    return {k: float(v) for k, v in out.items()}


def clear_aux_losses(reset: bool = False) -> None:
    """Zero the recorded aux losses (after an evaluation). ``reset``: forget their names and per-layer sizes
    too, for a new model in the same process (the tracker is process-global and sized by the first model)."""
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        if reset:
            # lazy: version (moe_logging: 0.19 only)
            from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

            destroy_moe_metrics_tracker()
        else:
            tracker.clear()
        return
    # lazy: version (0.16.1's legacy tracker; deprecated wrappers on 0.19)
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    if reset:
        get_moe_layer_wise_logging_tracker().clear()   # 0.16.1 returns the global dict itself
    else:
        clear_aux_losses_tracker()


def recorded_aux_losses() -> dict[str, torch.Tensor]:
    """{name: per-layer values recorded since the last report/clear} (local, unreduced; tests and logging)."""
    tracker = _moe_metrics_tracker()
    if tracker is not None:
        return {k: e.values.clone() for k, e in tracker.metrics.items()}
    # lazy: version (0.16.1's legacy tracker; deprecated wrappers on 0.19)
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return {k: e["values"].clone() for k, e in get_moe_layer_wise_logging_tracker().items()}


# -- versions ---------------------------------------------------------------------------------------------------
# The megatron-core releases CI runs the whole suite on (.ci/run): 0.16.1 on Python 3.11, 0.19.2 on Python 3.12.
TESTED_MEGATRON = ("0.16.1", "0.19.2")
_WARNED: set[str] = set()


def versions() -> dict[str, str]:
    """Versions of what a run depends on (``jtok-train --version`` and the run's log)."""
    out = {"jtok-train": jtok_train.__version__, "torch": torch.__version__}
    for dist in ("megatron-core", "transformer-engine", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def warn_if_untested() -> str | None:
    """One warning per process when the installed megatron-core is not a release CI tests; returns it."""
    have = versions()["megatron-core"]
    if have == "not installed" or have in _WARNED:
        return None
    try:
        tested = Version(have).release[:3] in {Version(v).release[:3] for v in TESTED_MEGATRON}
    except Exception:  # noqa: BLE001 - an unparsable local version string is untested too
        tested = False
    if tested:
        return None
    _WARNED.add(have)
    msg = (f"megatron-core {have} is not a version jtok-train is tested on (CI: {', '.join(TESTED_MEGATRON)}; "
           f"range {TESTED_MEGATRON[0]}..{TESTED_MEGATRON[-1]}): private Megatron names in "
           "jtok_train/compat/megatron.py may have moved")
    warnings.warn(msg, stacklevel=2)
    return msg
