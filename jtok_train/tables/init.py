"""Initial values of the JTok tables, defined per token id, independent of how the table is stored.

Ids are visited in the order of a fixed seeded permutation, in chunks of ``INIT_CHUNK`` ids, and each chunk's
rows come from a generator seeded by (seed, chunk). A sharded table that owns a contiguous range of the
permuted order regenerates only the chunks it overlaps, and gets the same values as the replicated one. The
same permutation places the rows on the ranks (``placement.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INIT_CHUNK", "row_permutation", "init_rows_for_permuted_range"]

INIT_CHUNK = 4096


def row_permutation(vocab_size: int, seed: int) -> Tensor:
    """Fixed seeded permutation of token ids: perm[q] is the token at permuted position q."""
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    return torch.randperm(vocab_size, generator=g)


def init_rows_for_permuted_range(
    start: int, stop: int, row_shape: tuple[int, ...], seed: int, std: float = 1.0, dtype=torch.float32,
    out: Tensor | None = None, layers: tuple[int, int] | None = None,
) -> Tensor:
    """N(0, std^2) rows for permuted positions [start, stop), the same whatever range is asked.
    ``row_shape`` is the whole model's (L, n_e, d); ``layers=(offset, count)`` keeps layers [offset,
    offset + count) of each row (a pipeline stage's), with the values those layers have in the whole table.
    ``out`` (shape [stop - start, count or L, ...]) is filled in place: no second copy of a shard."""
    lo_l, n_l = layers if layers is not None else (0, row_shape[0])
    if out is None:
        out = torch.empty((stop - start, n_l, *row_shape[1:]), dtype=dtype)
    chunk_lo = start // INIT_CHUNK
    chunk_hi = (stop - 1) // INIT_CHUNK if stop > start else chunk_lo - 1
    for c in range(chunk_lo, chunk_hi + 1):
        c0 = c * INIT_CHUNK
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + c)
        chunk = torch.randn((INIT_CHUNK, *row_shape), generator=g) * std
        lo, hi = max(start, c0), min(stop, c0 + INIT_CHUNK)
        out[lo - start : hi - start] = chunk[lo - c0 : hi - c0, lo_l : lo_l + n_l].to(out.dtype)
    return out

