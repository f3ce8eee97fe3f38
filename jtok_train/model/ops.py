"""The JTok hot path as functions: one entry point per operation, so a fused kernel can replace the
PyTorch reference without the modules knowing (the modules never branch on the device).

The references below are the specification; any fast path must match them on random inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["jtok_gate", "jtokm_blend", "jtok_gate_reference", "jtokm_blend_reference"]


def _l2n(u: Tensor, eps: float) -> Tensor:
    return u / (torch.linalg.vector_norm(u, dim=-1, keepdim=True) + eps)


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
    top_idx: Tensor,
    weights: Tensor,
    scale: Tensor,
    depth_factor: float,
    eps: float,
) -> Tensor:
    """dr = depth_factor * s * normalize(sum_k w_k E_{top_k}[x]).

    unique_rows [U, n_e, d], inverse [T], top_idx [T, K], weights [T, K] -> [T, d].
    """
    rows = unique_rows[inverse.unsqueeze(1), top_idx]          # [T, K, d]
    e = torch.einsum("tk,tkd->td", weights.to(rows.dtype), rows)
    return (depth_factor * scale) * _l2n(e, eps)


# Dispatch: the fused-kernel package registers itself here; the default is the reference.
jtok_gate = jtok_gate_reference
jtokm_blend = jtokm_blend_reference
