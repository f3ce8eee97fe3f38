"""The JTok hot path as functions: one entry point per operation, so a fused kernel can replace the
PyTorch reference without the modules knowing (the modules never branch on the device).

The references below are the specification; the Triton kernels (``jtok_kernels``) must match them
on random inputs, forward and every gradient.

Backend (which implementation ``jtok_gate`` / ``jtokm_blend`` / ``segment_sum`` run):

- ``auto`` (default): the Triton kernels when the tensors are on CUDA, Triton imports and the dtypes are
  fp32/bf16/fp16; the reference otherwise.
- ``triton``: always the kernels. On CPU tensors this needs Triton's interpreter (``TRITON_INTERPRET=1``
  set before the kernels are first imported; the tests do this), else it raises.
- ``reference``: always the PyTorch references.

Chosen by the environment variable ``JTOK_KERNELS`` (read at import), by ``set_kernel_backend(name)``, or
for a block with ``with kernel_backend(name): ...``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

__all__ = [
    "jtok_gate", "jtokm_blend", "segment_sum",
    "jtok_gate_reference", "jtokm_blend_reference", "segment_sum_reference",
    "BACKENDS", "set_kernel_backend", "get_kernel_backend", "kernel_backend", "resolve_backend",
]

BACKENDS = ("auto", "triton", "reference")


def _l2n(u: Tensor, eps: float) -> Tensor:
    return u / (torch.linalg.vector_norm(u, dim=-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------------
# References (the specification)


def jtok_gate_reference(
    ffn_increment: Tensor, unique_rows: Tensor, inverse: Tensor, scale: Tensor, eps: float
) -> Tensor:
    """dm * (1 + s * normalize(E[x])): ffn_increment [T, d], unique_rows [U, d], inverse [T] -> [T, d]."""
    n = _l2n(unique_rows, eps)                       # normalise once per unique id (dedup)
    gate = 1.0 + scale * n                           # [U, d]
    return ffn_increment * gate.index_select(0, inverse).to(ffn_increment.dtype)


def jtokm_blend_reference(
    unique_rows: Tensor,
    inverse: Tensor,
    top_logits: Tensor,
    top_idx: Tensor,
    scale: Tensor,
    depth_factor: float,
    eps: float,
) -> Tensor:
    """dr = depth_factor * s * normalize(sum_k w_k E_{top_k}[x]),  w_k = sigmoid(l_k) / sum_j sigmoid(l_j).

    unique_rows [U, n_e, d], inverse [T], top_logits [T, K] (the router logits of the top-K sets, so the
    gradient reaches the router through them), top_idx [T, K] (their set ids) -> [T, d].
    """
    top_scores = torch.sigmoid(top_logits)
    weights = top_scores / top_scores.sum(dim=-1, keepdim=True)       # renormalised over the K
    # gather the K chosen rows of every position from the flattened [U * n_e, d] rows: index_select's backward
    # (index_add_) adds the positions' gradients in a fixed order on CPU, where advanced indexing's
    # (index_put_ with accumulate) does not, which made two identical CPU runs differ in the last bits
    U, n_e, d = unique_rows.shape
    flat = (inverse.unsqueeze(1) * n_e + top_idx).reshape(-1)
    rows = unique_rows.reshape(U * n_e, d).index_select(0, flat).view(*top_idx.shape, d)   # [T, K, d]
    # a broadcast product summed over K, not einsum: einsum makes it T batched [1, K] x [K, d] matmuls, which on
    # CPU cost 2.5x the whole blend's forward and backward otherwise (benchmarks/blend_bench.py)
    e = (weights.to(rows.dtype).unsqueeze(-1) * rows).sum(dim=1)
    return (depth_factor * scale) * _l2n(e, eps)


def segment_sum_reference(values: Tensor, inverse: Tensor, num_segments: int) -> Tensor:
    """out[u] = sum of values[t] over t with inverse[t] == u: values [T, ...] -> [num_segments, ...]."""
    out = torch.zeros((num_segments, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, inverse, values)


# ---------------------------------------------------------------------------------------------------
# Backend choice


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a JTok kernel backend: use one of {', '.join(BACKENDS)}")
    return name


_backend = os.environ.get("JTOK_KERNELS", "auto").strip().lower() or "auto"


def set_kernel_backend(name: str) -> None:
    """'auto' | 'triton' | 'reference' for every later call (overrides JTOK_KERNELS)."""
    global _backend
    _backend = _check_backend(str(name).strip().lower(), "kernel backend")


def get_kernel_backend() -> str:
    return _backend


@contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """``with kernel_backend('reference'): ...`` runs the block with that backend, then restores the old one."""
    global _backend
    old = _backend
    set_kernel_backend(name)
    try:
        yield
    finally:
        _backend = old


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(*tensors: Tensor) -> str:
    """'triton' or 'reference' for an op on these (floating-point) tensors under the current setting."""
    name = _check_backend(_backend, "JTOK_KERNELS")
    if name == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        if not on_cuda or any(t.dtype not in _TRITON_DTYPES for t in tensors):
            return "reference"
        from jtok_kernels import interpreted, triton_import_error

        return "triton" if triton_import_error() is None and not interpreted() else "reference"
    from jtok_kernels import interpreted, triton_import_error

    err = triton_import_error()
    if err is not None:
        raise RuntimeError(f"JTOK_KERNELS=triton but Triton does not import ({err}); install triton or use "
                           "JTOK_KERNELS=auto or reference")
    if not on_cuda and not interpreted():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"JTOK_KERNELS=triton but the tensors are on {', '.join(devices)}: the Triton kernels "
                           "need CUDA tensors, or TRITON_INTERPRET=1 set before the kernels are imported; use "
                           "JTOK_KERNELS=auto or reference")
    return "triton"


# ---------------------------------------------------------------------------------------------------
# Dispatch: callers use these and nothing else.


def jtok_gate(ffn_increment: Tensor, unique_rows: Tensor, inverse: Tensor, scale: Tensor, eps: float) -> Tensor:
    if resolve_backend(ffn_increment, unique_rows, scale) == "triton":
        from jtok_kernels.jtok import jtok_gate_triton

        return jtok_gate_triton(ffn_increment, unique_rows, inverse, scale, eps)
    return jtok_gate_reference(ffn_increment, unique_rows, inverse, scale, eps)


def jtokm_blend(
    unique_rows: Tensor, inverse: Tensor, top_logits: Tensor, top_idx: Tensor, scale: Tensor,
    depth_factor: float, eps: float,
) -> Tensor:
    if resolve_backend(unique_rows, top_logits, scale) == "triton":
        from jtok_kernels.jtokm import jtokm_blend_triton

        return jtokm_blend_triton(unique_rows, inverse, top_logits, top_idx, scale, depth_factor, eps)
    return jtokm_blend_reference(unique_rows, inverse, top_logits, top_idx, scale, depth_factor, eps)


def segment_sum(values: Tensor, inverse: Tensor, num_segments: int) -> Tensor:
    if resolve_backend(values) == "triton":
        from jtok_kernels.segment import segment_sum_triton

        return segment_sum_triton(values, inverse, num_segments)
    return segment_sum_reference(values, inverse, num_segments)
