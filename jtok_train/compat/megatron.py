"""Megatron-Core behaviour this project corrects or depends on, in one place (version ranges per entry).

Each entry names the megatron-core versions it was checked on and the upstream code it tracks. Unlike
``compat/cpu.py`` nothing here is about the CPU: these apply on every device.
"""

from __future__ import annotations

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


def apply_megatron_fixes() -> None:
    """Idempotent; called when Megatron's parallel state is set up (compat.init_model_parallel)."""
    global _APPLIED
    if _APPLIED:
        return
    _fix_checkpoint_without_output_fp8()
    _APPLIED = True
