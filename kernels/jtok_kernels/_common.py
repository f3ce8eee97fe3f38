"""Shared pieces of the kernels: block sizes, dtypes, the CSR grouping of positions by unique row."""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

# Column block of every kernel: rows longer than this are processed in a loop over blocks, so register
# use does not grow with the hidden size. Tests lower it to exercise the loops on small rows.
MAX_BLOCK_D = 1024

# Segment loops (gradients summed per unique row) take BLOCK_P positions per step: Zipfian ids give a few
# rows thousands of positions, and one position per step would leave such a program latency-bound. Their
# column block is capped at SEGMENT_BLOCK_D so a [BLOCK_P, block] tile stays in registers.
BLOCK_P = 16
SEGMENT_BLOCK_D = 256

# Dtypes the kernels load and store (they compute in fp32). Others go to the reference.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpret_flag() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# triton.jit reads the flag when it decorates, i.e. when the kernel modules are imported right after this.
INTERPRETED = _interpret_flag()


def block_d(d: int, cap: int | None = None) -> int:
    """Column block for rows of length d: a power of two, at most MAX_BLOCK_D (and ``cap``)."""
    limit = MAX_BLOCK_D if cap is None else min(cap, MAX_BLOCK_D)
    return max(16, min(triton.next_power_of_2(d), limit))


def block_small(n: int) -> int:
    """Block for a short axis (K, n_e): a power of two, at least 2."""
    return max(2, triton.next_power_of_2(n))


def csr_by_segment(inverse: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """Positions grouped by unique index: ``order`` [T] (stable: ascending positions within a segment) and
    ``offsets`` [U + 1], so segment u is ``order[offsets[u]:offsets[u + 1]]``. Deterministic (sort + search)."""
    order = torch.argsort(inverse, stable=True)
    sorted_inv = inverse.index_select(0, order)
    bounds = torch.arange(num_segments + 1, device=inverse.device, dtype=sorted_inv.dtype)
    offsets = torch.searchsorted(sorted_inv, bounds)
    return order, offsets


def check_dtypes(what: str, **tensors: Tensor) -> None:
    """One-line error for a tensor the kernels do not take (they compute in fp32 from fp32/bf16/fp16)."""
    for name, t in tensors.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{what}: the Triton kernel takes {SUPPORTED_DTYPES}, got {name} in {t.dtype}; "
                             "use the reference backend (JTOK_KERNELS=reference) for this dtype")


def check_inverse(inverse: Tensor, T: int, what: str) -> None:
    if inverse.dim() != 1 or inverse.numel() != T:
        raise ValueError(f"{what}: inverse has shape {tuple(inverse.shape)}, expected [{T}] (one unique index per position)")
    if inverse.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: inverse has dtype {inverse.dtype}; pass an int64 index (torch.unique's inverse)")
