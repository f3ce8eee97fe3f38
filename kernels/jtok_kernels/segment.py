"""Deterministic segment sums: ``out[u] = sum of values[t] over the positions t with inverse[t] == u``.

Reference (``jtok_kernels.ops.segment_sum_reference``): ``torch.zeros(U, ...).index_add_(0, inverse,
values)``. On CUDA ``index_add_`` uses atomics, so its result depends on the order in which threads land;
here positions are sorted by segment once and one program per (segment, column block) adds its
positions in ascending order, in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from jtok_kernels import _common
from jtok_kernels._common import check_dtypes, block_d, check_inverse, csr_by_segment

__all__ = ["segment_sum_triton", "SegmentSum"]


@triton.jit
def _segment_sum_kernel(values, order, offsets, out, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    start = tl.load(offsets + u)
    end = tl.load(offsets + u + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i0 in range(start, end, BLOCK_P):          # BLOCK_P positions per step, a fixed reduction order
        ps = i0 + tl.arange(0, BLOCK_P)
        pm = ps < end
        t = tl.load(order + ps, mask=pm, other=0).to(tl.int64)
        v = tl.load(values + t[:, None] * D + cols[None, :], mask=pm[:, None] & m[None, :], other=0.0)
        acc += tl.sum(v.to(tl.float32), axis=0)
    tl.store(out + u.to(tl.int64) * D + cols, acc.to(out.dtype.element_ty), mask=m)


def _segment_sum(values: Tensor, inverse: Tensor, num_segments: int) -> Tensor:
    T = values.shape[0]
    flat = values.reshape(T, -1).contiguous()
    D = flat.shape[1]
    out = torch.empty((num_segments, D), dtype=values.dtype, device=values.device)
    if num_segments == 0 or D == 0:
        return out.view(num_segments, *values.shape[1:])
    order, offsets = csr_by_segment(inverse, num_segments)
    bd = block_d(D, cap=_common.SEGMENT_BLOCK_D)
    _segment_sum_kernel[(num_segments, triton.cdiv(D, bd))](flat, order, offsets, out, D, BLOCK_P=_common.BLOCK_P, BLOCK_D=bd)
    return out.view(num_segments, *values.shape[1:])


class SegmentSum(torch.autograd.Function):
    """Forward: segment sums; backward: each position gets its segment's gradient (a gather)."""

    @staticmethod
    def forward(ctx, values: Tensor, inverse: Tensor, num_segments: int) -> Tensor:
        ctx.save_for_backward(inverse)
        return _segment_sum(values, inverse, num_segments)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def segment_sum_triton(values: Tensor, inverse: Tensor, num_segments: int) -> Tensor:
    """values [T, ...], inverse [T] with values in [0, num_segments) -> [num_segments, ...] (values' dtype)."""
    if values.dim() < 1:
        raise ValueError("segment_sum: values must have a leading position axis [T, ...], got a scalar")
    check_inverse(inverse, values.shape[0], "segment_sum")
    check_dtypes("segment_sum", values=values)
    return SegmentSum.apply(values, inverse, int(num_segments))
