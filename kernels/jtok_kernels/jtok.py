"""Fused JTok gate: ``out[t] = dm[t] * (1 + s * normalize(E[u(t)]))`` with its backward.

Reference: ``jtok_kernels.ops.jtok_gate_reference`` (the specification these kernels must match).

Forward, two kernels:
  1. one program per unique row: c_u = 1 / (||E_u|| + eps)                     (dedup: U norms, not T)
  2. one program per (position, column block): out = dm * (1 + s * E_u * c_u)
Backward, two kernels:
  3. one program per (unique row, column block), looping over the row's positions in a fixed order
     (BLOCK_P at a time):
     d_dm[t] = g[t] * gate_u;  A_u = sum_t g[t] * dm[t];  dn_u = s * A_u;  ds_u = n_u * A_u
  4. one program per unique row: d_E_u = c dn - c^2 (E_u . dn) / ||E_u|| * E_u   (zero term when E_u = 0)
and d_s = sum_u ds_u (a fixed-shape torch reduction: deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from jtok_kernels import _common
from jtok_kernels._common import check_dtypes, block_d, check_inverse, csr_by_segment

__all__ = ["jtok_gate_triton", "JTokGate"]


@triton.jit
def _row_inv_norm_kernel(rows, inv_norm, RS, D, eps, BLOCK_D: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        r = tl.load(rows + u * RS + cols, mask=cols < D, other=0.0).to(tl.float32)
        acc += r * r
    tl.store(inv_norm + u, 1.0 / (tl.sqrt(tl.sum(acc, axis=0)) + eps))


@triton.jit
def _gate_fwd_kernel(dm, rows, inverse, scale, inv_norm, out, RS, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    u = tl.load(inverse + t).to(tl.int64)
    c = tl.load(inv_norm + u)
    r = tl.load(rows + u * RS + cols, mask=m, other=0.0).to(tl.float32)
    s = tl.load(scale + cols, mask=m, other=0.0).to(tl.float32)
    x = tl.load(dm + t * D + cols, mask=m, other=0.0).to(tl.float32)
    y = x * (1.0 + s * r * c)
    tl.store(out + t * D + cols, y.to(out.dtype.element_ty), mask=m)


@triton.jit
def _gate_bwd_segment_kernel(grad, dm, rows, scale, inv_norm, order, offsets, d_dm, dn, ds_part, RS, D,
                             BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    c = tl.load(inv_norm + u)
    n = tl.load(rows + u * RS + cols, mask=m, other=0.0).to(tl.float32) * c
    s = tl.load(scale + cols, mask=m, other=0.0).to(tl.float32)
    gate = 1.0 + s * n
    start = tl.load(offsets + u)
    end = tl.load(offsets + u + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i0 in range(start, end, BLOCK_P):          # BLOCK_P of the row's positions per step
        ps = i0 + tl.arange(0, BLOCK_P)
        pm = ps < end
        t = tl.load(order + ps, mask=pm, other=0).to(tl.int64)
        at = t[:, None] * D + cols[None, :]
        am = pm[:, None] & m[None, :]
        g = tl.load(grad + at, mask=am, other=0.0).to(tl.float32)
        x = tl.load(dm + at, mask=am, other=0.0).to(tl.float32)
        tl.store(d_dm + at, (g * gate[None, :]).to(d_dm.dtype.element_ty), mask=am)
        acc += tl.sum(g * x, axis=0)
    tl.store(dn + u * D + cols, s * acc, mask=m)
    tl.store(ds_part + u * D + cols, n * acc, mask=m)


@triton.jit
def _l2n_bwd_kernel(rows, dn, d_rows, RS, D, eps, BLOCK_D: tl.constexpr):
    """d/dE of normalize(E) = E / (||E|| + eps), given dn = dL/dnormalize(E), one row per program."""
    u = tl.program_id(0).to(tl.int64)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        m = cols < D
        r = tl.load(rows + u * RS + cols, mask=m, other=0.0).to(tl.float32)
        sq += r * r
        dot += r * tl.load(dn + u * D + cols, mask=m, other=0.0)
    norm = tl.sqrt(tl.sum(sq, axis=0))
    c = 1.0 / (norm + eps)
    safe = tl.where(norm > 0.0, norm, 1.0)
    coef = tl.where(norm > 0.0, c * c * tl.sum(dot, axis=0) / safe, 0.0)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        m = cols < D
        r = tl.load(rows + u * RS + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(dn + u * D + cols, mask=m, other=0.0)
        tl.store(d_rows + u * D + cols, (c * g - coef * r).to(d_rows.dtype.element_ty), mask=m)


class JTokGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ffn_increment: Tensor, unique_rows: Tensor, inverse: Tensor, scale: Tensor, eps: float) -> Tensor:
        dm = ffn_increment.contiguous()
        rows = unique_rows if unique_rows.stride(-1) == 1 else unique_rows.contiguous()   # a layer's slice: no copy
        s = scale.contiguous()
        T, D = dm.shape
        U = rows.shape[0]
        inv_norm = torch.empty(U, dtype=torch.float32, device=rows.device)
        out = torch.empty_like(dm)
        bd = block_d(D)
        if U > 0:
            _row_inv_norm_kernel[(U,)](rows, inv_norm, rows.stride(0), D, eps, BLOCK_D=bd)
        if T > 0:
            _gate_fwd_kernel[(T, triton.cdiv(D, bd))](dm, rows, inverse, s, inv_norm, out, rows.stride(0), D, BLOCK_D=bd)
        ctx.save_for_backward(dm, rows, inverse, s, inv_norm)
        ctx.eps = eps
        ctx.scale_dtype = scale.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        dm, rows, inverse, s, inv_norm = ctx.saved_tensors
        g = grad.contiguous()
        T, D = dm.shape
        U = rows.shape[0]
        bd = block_d(D)
        d_dm = torch.empty_like(dm)
        dn = torch.empty((U, D), dtype=torch.float32, device=dm.device)
        ds_part = torch.empty((U, D), dtype=torch.float32, device=dm.device)
        d_rows = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        if U > 0:
            order, offsets = csr_by_segment(inverse, U)
            sbd = block_d(D, cap=_common.SEGMENT_BLOCK_D)
            _gate_bwd_segment_kernel[(U, triton.cdiv(D, sbd))](
                g, dm, rows, s, inv_norm, order, offsets, d_dm, dn, ds_part, rows.stride(0), D,
                BLOCK_P=_common.BLOCK_P, BLOCK_D=sbd)
            _l2n_bwd_kernel[(U,)](rows, dn, d_rows, rows.stride(0), D, ctx.eps, BLOCK_D=bd)
        ds = ds_part.sum(dim=0).to(ctx.scale_dtype)
        return d_dm, d_rows, None, ds, None


def jtok_gate_triton(ffn_increment: Tensor, unique_rows: Tensor, inverse: Tensor, scale: Tensor, eps: float) -> Tensor:
    """Same contract as ``jtok_gate_reference``: ffn_increment [T, d], unique_rows [U, d], inverse [T],
    scale [d] -> [T, d] in ffn_increment's dtype."""
    if ffn_increment.dim() != 2 or unique_rows.dim() != 2 or unique_rows.shape[1] != ffn_increment.shape[1]:
        raise ValueError(f"jtok_gate: expected ffn_increment [T, d] and unique_rows [U, d], got "
                         f"{tuple(ffn_increment.shape)} and {tuple(unique_rows.shape)}")
    if scale.numel() != ffn_increment.shape[1]:
        raise ValueError(f"jtok_gate: scale has {scale.numel()} elements, expected d={ffn_increment.shape[1]}")
    check_inverse(inverse, ffn_increment.shape[0], "jtok_gate")
    check_dtypes("jtok_gate", ffn_increment=ffn_increment, unique_rows=unique_rows, scale=scale)
    return JTokGate.apply(ffn_increment, unique_rows, inverse, scale.reshape(-1), float(eps))
