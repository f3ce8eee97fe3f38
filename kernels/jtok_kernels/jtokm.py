"""Fused JTok-M blend: router top-K logits -> sigmoid, renormalised weights -> blend of K of the position's
n_e rows -> L2-normalise -> scale, with its backward to the rows, the top-K logits and s.

Reference: ``jtok_kernels.ops.jtokm_blend_reference`` (the specification these kernels must match).
For position t with unique row u, top-K logits l_k and set ids i_k (k < K):

    w_k = sigmoid(l_k) / sum_j sigmoid(l_j);   e = sum_k w_k E_{u, i_k};   N = ||e||;   c = 1 / (N + eps)
    y   = a * s * e * c                                             (a = depth_factor)

Backward with g = dL/dy, dn = a s g:
    de    = c dn - gamma e,     gamma = c^2 (e . dn) / N  (0 when N = 0)
    dw_k  = E_{u, i_k} . de = c (E_{u,i_k} . dn) - gamma (E_{u,i_k} . e)
    dl_k  = sigmoid'(l_k) / sum_j sigmoid(l_j) * (dw_k - sum_j w_j dw_j)
    dE_{u, i} = sum over the positions t of u, and their k with i_k = i, of w_k de_t
    ds    = sum_t a g e c

Kernels: forward, one program per position (two passes over column blocks: ||e||, then y; N is kept);
backward 1, one program per position (one pass: the dot products -> dl_k and gamma_t); backward 2, one
program per (unique row, column block) looping over the row's positions in a fixed order (CSR, BLOCK_P
positions per step) to accumulate the n_e candidates' dE and ds in fp32: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from jtok_kernels import _common
from jtok_kernels._common import check_dtypes, block_d, block_small, check_inverse, csr_by_segment

__all__ = ["jtokm_blend_triton", "JTokMBlend"]


@triton.jit
def _weights(top_logits, t, K, ks, kmask):
    l = tl.load(top_logits + t * K + ks, mask=kmask, other=0.0).to(tl.float32)
    sig = tl.where(kmask, tl.sigmoid(l), 0.0)
    total = tl.sum(sig, axis=0)
    return sig, total, sig / total


@triton.jit
def _blend_fwd_kernel(rows, inverse, top_logits, top_idx, scale, out, norm_out, RS, D, NE, K, depth, eps,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    u = tl.load(inverse + t).to(tl.int64)
    _, _, w = _weights(top_logits, t, K, ks, kmask)
    idx = tl.load(top_idx + t * K + ks, mask=kmask, other=0).to(tl.int64)
    base = u * RS + idx * D                                               # [BLOCK_K]
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        m = cols < D
        r = tl.load(rows + base[:, None] + cols[None, :], mask=kmask[:, None] & m[None, :], other=0.0)
        e = tl.sum(w[:, None] * r.to(tl.float32), axis=0)
        sq += e * e
    norm = tl.sqrt(tl.sum(sq, axis=0))
    tl.store(norm_out + t, norm)
    c = 1.0 / (norm + eps)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        m = cols < D
        r = tl.load(rows + base[:, None] + cols[None, :], mask=kmask[:, None] & m[None, :], other=0.0)
        e = tl.sum(w[:, None] * r.to(tl.float32), axis=0)
        s = tl.load(scale + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out + t * D + cols, (depth * s * e * c).to(out.dtype.element_ty), mask=m)


@triton.jit
def _blend_bwd_pos_kernel(grad, rows, inverse, top_logits, top_idx, scale, norm_in, d_logits, gamma_out,
                          RS, D, NE, K, depth, eps, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    u = tl.load(inverse + t).to(tl.int64)
    sig, total, w = _weights(top_logits, t, K, ks, kmask)
    idx = tl.load(top_idx + t * K + ks, mask=kmask, other=0).to(tl.int64)
    base = u * RS + idx * D
    e_dn = tl.zeros([BLOCK_D], dtype=tl.float32)
    r_dn = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    r_e = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        m = cols < D
        r = tl.load(rows + base[:, None] + cols[None, :], mask=kmask[:, None] & m[None, :], other=0.0).to(tl.float32)
        e = tl.sum(w[:, None] * r, axis=0)
        s = tl.load(scale + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(grad + t * D + cols, mask=m, other=0.0).to(tl.float32)
        dn = depth * s * g
        e_dn += e * dn
        r_dn += r * dn[None, :]
        r_e += r * e[None, :]
    norm = tl.load(norm_in + t)
    c = 1.0 / (norm + eps)
    safe = tl.where(norm > 0.0, norm, 1.0)
    gamma = tl.where(norm > 0.0, c * c * tl.sum(e_dn, axis=0) / safe, 0.0)
    dw = c * tl.sum(r_dn, axis=1) - gamma * tl.sum(r_e, axis=1)              # [BLOCK_K]
    dl = sig * (1.0 - sig) / total * (dw - tl.sum(w * dw, axis=0))
    tl.store(d_logits + t * K + ks, dl.to(d_logits.dtype.element_ty), mask=kmask)
    tl.store(gamma_out + t, gamma)


@triton.jit
def _blend_bwd_rows_kernel(grad, rows, top_logits, top_idx, scale, norm_in, gamma_in, order, offsets,
                           d_rows, ds_part, RS, D, NE, K, depth, eps,
                           BLOCK_K: tl.constexpr, BLOCK_NE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    es = tl.arange(0, BLOCK_NE)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    s = tl.load(scale + cols, mask=m, other=0.0).to(tl.float32)
    emask = es < NE
    tmask = emask[:, None] & m[None, :]
    cand = tl.load(rows + u * RS + es[:, None] * D + cols[None, :], mask=tmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_NE, BLOCK_D], dtype=tl.float32)      # d rows of this row's n_e candidates
    ds = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = tl.load(offsets + u)
    end = tl.load(offsets + u + 1)
    for i0 in range(start, end, BLOCK_P):                      # BLOCK_P of the row's positions per step
        ps = i0 + tl.arange(0, BLOCK_P)
        pm = ps < end
        t = tl.load(order + ps, mask=pm, other=0).to(tl.int64)                       # [P]
        lk = pm[:, None] & kmask[None, :]
        l = tl.load(top_logits + t[:, None] * K + ks[None, :], mask=lk, other=0.0).to(tl.float32)
        sig = tl.where(lk, tl.sigmoid(l), 0.0)
        total = tl.sum(sig, axis=1)
        w = sig / tl.where(total > 0.0, total, 1.0)[:, None]                          # [P, K]
        idx = tl.load(top_idx + t[:, None] * K + ks[None, :], mask=lk, other=-1)
        w_full = tl.sum(tl.where(idx[:, :, None] == es[None, None, :], w[:, :, None], 0.0), axis=1)   # [P, NE]
        norm = tl.load(norm_in + t, mask=pm, other=0.0)
        c = 1.0 / (norm + eps)
        gamma = tl.load(gamma_in + t, mask=pm, other=0.0)
        g = tl.load(grad + t[:, None] * D + cols[None, :], mask=pm[:, None] & m[None, :], other=0.0).to(tl.float32)
        e = tl.dot(w_full, cand, input_precision="ieee")                            # [P, D], fp32 FMA
        de = (c * depth)[:, None] * s[None, :] * g - gamma[:, None] * e               # [P, D]
        acc += tl.dot(tl.trans(w_full), de, input_precision="ieee")                  # [NE, D]
        ds += tl.sum(depth * g * e * c[:, None], axis=0)
    tile = (u * NE + es)[:, None] * D + cols[None, :]
    tl.store(d_rows + tile, acc.to(d_rows.dtype.element_ty), mask=tmask)
    tl.store(ds_part + u * D + cols, ds, mask=m)


class JTokMBlend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unique_rows: Tensor, inverse: Tensor, top_logits: Tensor, top_idx: Tensor, scale: Tensor,
                depth_factor: float, eps: float) -> Tensor:
        # a layer's slice of the [U, L, n_e, d] rows is used in place (only the row stride differs)
        rows = unique_rows if unique_rows.stride(2) == 1 and unique_rows.stride(1) == unique_rows.shape[2] else unique_rows.contiguous()
        logits = top_logits.contiguous()
        idx = top_idx.contiguous()
        s = scale.contiguous()
        U, NE, D = rows.shape
        T, K = logits.shape
        out_dtype = torch.promote_types(rows.dtype, scale.dtype)
        out = torch.empty((T, D), dtype=out_dtype, device=rows.device)
        norm = torch.empty(T, dtype=torch.float32, device=rows.device)
        if T > 0:
            _blend_fwd_kernel[(T,)](rows, inverse, logits, idx, s, out, norm, rows.stride(0), D, NE, K, float(depth_factor), float(eps),
                                    BLOCK_K=block_small(K), BLOCK_D=block_d(D))
        ctx.save_for_backward(rows, inverse, logits, idx, s, norm)
        ctx.depth, ctx.eps, ctx.scale_dtype = float(depth_factor), float(eps), scale.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, inverse, logits, idx, s, norm = ctx.saved_tensors
        g = grad.contiguous()
        U, NE, D = rows.shape
        T, K = logits.shape
        bd, bk = block_d(D), block_small(K)
        d_logits = torch.empty_like(logits)
        gamma = torch.empty(T, dtype=torch.float32, device=rows.device)
        d_rows = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
        ds_part = torch.empty((U, D), dtype=torch.float32, device=rows.device)
        if T > 0:
            _blend_bwd_pos_kernel[(T,)](g, rows, inverse, logits, idx, s, norm, d_logits, gamma, rows.stride(0), D, NE, K,
                                        ctx.depth, ctx.eps, BLOCK_K=bk, BLOCK_D=bd)
        if U > 0:
            order, offsets = csr_by_segment(inverse, U)
            sbd = max(16, block_d(D, cap=_common.SEGMENT_BLOCK_D // 2))   # tl.dot tiles: every side >= 16
            _blend_bwd_rows_kernel[(U, triton.cdiv(D, sbd))](
                g, rows, logits, idx, s, norm, gamma, order, offsets, d_rows, ds_part, rows.stride(0), D, NE, K, ctx.depth, ctx.eps,
                BLOCK_K=bk, BLOCK_NE=max(16, block_small(NE)), BLOCK_P=max(16, _common.BLOCK_P), BLOCK_D=sbd)
        ds = ds_part.sum(dim=0).to(ctx.scale_dtype)
        return d_rows, None, d_logits, None, ds, None, None


def jtokm_blend_triton(unique_rows: Tensor, inverse: Tensor, top_logits: Tensor, top_idx: Tensor, scale: Tensor,
                       depth_factor: float, eps: float) -> Tensor:
    """Same contract as ``jtokm_blend_reference``: unique_rows [U, n_e, d], inverse [T], top_logits [T, K],
    top_idx [T, K] (distinct set ids per position), scale [d] -> [T, d]."""
    if unique_rows.dim() != 3:
        raise ValueError(f"jtokm_blend: unique_rows must be [U, n_e, d], got shape {tuple(unique_rows.shape)}")
    if top_logits.dim() != 2 or top_idx.shape != top_logits.shape:
        raise ValueError(f"jtokm_blend: top_logits and top_idx must both be [T, K], got "
                         f"{tuple(top_logits.shape)} and {tuple(top_idx.shape)}")
    n_e, d = unique_rows.shape[1], unique_rows.shape[2]
    if not 1 <= top_logits.shape[1] <= n_e:
        raise ValueError(f"jtokm_blend: K={top_logits.shape[1]} must be in [1, n_e={n_e}]")
    if scale.numel() != d:
        raise ValueError(f"jtokm_blend: scale has {scale.numel()} elements, expected d={d}")
    check_inverse(inverse, top_logits.shape[0], "jtokm_blend")
    check_dtypes("jtokm_blend", unique_rows=unique_rows, top_logits=top_logits, scale=scale)
    return JTokMBlend.apply(unique_rows, inverse, top_logits, top_idx, scale.reshape(-1), depth_factor, eps)
