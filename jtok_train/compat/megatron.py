"""Megatron-Core behaviour this project corrects or depends on, in one place (version ranges per entry).

Each entry names the megatron-core versions it was checked on and the upstream code it tracks. Unlike
``compat/cpu.py`` nothing here is about the CPU: these apply on every device.
"""

from __future__ import annotations

import torch

__all__ = ["apply_megatron_fixes"]

_APPLIED = False


def _fix_checkpoint_without_output_fp8() -> None:
    """``tensor_parallel.CheckpointWithoutOutput(fp8=False)`` sets ``self.fp8 = fp8 is not None`` (True), so its
    forward asks Transformer Engine's FP8GlobalStateManager whether FP8 is on; without Transformer Engine
    that name is undefined and the selective recompute of ``layernorm`` (and MoE's ``moe_act``) fails with a
    NameError. Without TE there is no FP8: force the flag off. Checked on megatron-core 0.16.1
    (tensor_parallel/random.py, CheckpointWithoutOutput.__init__); a no-op where TE is installed."""
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
    that was just set. Checked on megatron-core 0.16.1 (optimizer/distrib_optimizer.py,
    _set_main_param_and_optimizer_states); a no-op with Apex/TE."""
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
    megatron-core 0.16.1 (optimizer/distrib_optimizer.py, load_state_dict and
    load_parameter_state_from_dp_reshardable); a no-op with Apex/TE (the step lives in the groups)."""
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
