"""Where the JTok rows come from: the provider interface and the replicated (local) table.

A provider turns a micro-batch's token ids into ``TokenRows``: the rows of every layer for the
*unique* ids, plus the inverse index from positions to unique ids. The layers only ever see
``TokenRows``; whether the table is replicated or row-sharded across ranks (with an all-to-all
exchange) is the provider's business.

Initial values are defined per token id, independent of how the table is stored: ids are visited in
the order of a fixed seeded permutation, in chunks of ``INIT_CHUNK`` ids, and each chunk's rows come
from a generator seeded by (seed, chunk). A sharded table that owns a contiguous range of the
permuted order regenerates only the chunks it overlaps, and gets the same values as this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TokenRows",
    "TokenRowProvider",
    "ReplicatedTokenTable",
    "TokenRowsContext",
    "ReplayGradSink",
    "RowGradJoin",
    "row_permutation",
    "init_rows_for_permuted_range",
    "LayerSlice",
    "check_token_ids",
    "INIT_CHUNK",
]

INIT_CHUNK = 4096


class ReplayGradSink:
    """Row gradients of layers replayed by Megatron's activation recompute, for one micro-batch.

    Megatron's full recompute is reentrant (``tensor_parallel.checkpoint``): the layers' forward runs again
    inside the backward and a nested ``torch.autograd.backward`` differentiates it. Rows captured from
    outside the checkpoint would make that nested backward run the table's own backward (the exchange of
    row gradients) once per replayed chunk. Instead a replayed layer reads a detached copy of its rows, the
    copy's gradient lands here, and ``RowGradJoin`` (at the decoder input, whose backward comes after every
    layer's) hands the sum to the table's backward once. Layer ``i``'s gradient fills ``[:, i]`` only, so
    the result is bitwise that of the run without recompute."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    def add(self, layer_index: int, like: Tensor, grad: Tensor) -> None:
        if self.grad is None:
            self.grad = torch.zeros_like(like)
        self.grad[:, layer_index] += grad

    def take(self) -> Tensor | None:
        grad, self.grad = self.grad, None
        return grad


class RowGradJoin(torch.autograd.Function):
    """Identity on (decoder input, unique rows); the backward adds the replayed layers' row gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, rows: Tensor, sink: ReplayGradSink):
        ctx.sink = sink
        return hidden.view_as(hidden), rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad_hidden: Tensor, grad_rows: Tensor):
        extra = ctx.sink.take()
        if extra is not None:
            grad_rows = extra.to(grad_rows.dtype) + grad_rows
        return grad_hidden, grad_rows, None


@dataclass
class TokenRows:
    """The rows a micro-batch needs. Positions are in Megatron's [s, b] order (T = s*b)."""

    unique_ids: Tensor    # [U] sorted unique token ids
    unique_rows: Tensor   # [U, L, n_e, d] rows of every layer of this stage (autograd-connected)
    inverse: Tensor       # [T] position -> index into unique_ids
    replay_sink: "ReplayGradSink | None" = None   # set when the layers may be replayed by full recompute

    def layer(self, index: int) -> Tensor:
        """Rows of one layer (0-based index within the stage): [U, n_e, d]."""
        return self.unique_rows[:, index]


@runtime_checkable
class TokenRowProvider(Protocol):
    num_layers: int
    num_sets: int
    hidden_size: int
    vocab_size: int

    def lookup(self, token_ids: Tensor) -> TokenRows:
        """token_ids: [b, s] -> the rows for the micro-batch's positions."""
        ...


class TokenRowsContext:
    """Hands the current micro-batch's ``TokenRows`` from the model to its layers.

    Megatron's TransformerBlock calls layers with a fixed set of arguments, so the rows cannot
    travel as an argument; the model sets ``current`` around its forward and the layers read it.
    """

    def __init__(self) -> None:
        self.current: TokenRows | None = None

    def rows(self) -> TokenRows:
        if self.current is None:
            raise RuntimeError(
                "JTok layer ran outside a JTok model forward: no token rows were looked up for this "
                "micro-batch (call the JTokGPTModel, not its decoder, or set context.current)"
            )
        return self.current


def check_token_ids(token_ids: Tensor, vocab_size: int) -> None:
    """Raise a clear error for ids outside [0, vocab_size) (before any gather or collective)."""
    if token_ids.numel() == 0:
        return
    lo, hi = int(token_ids.min()), int(token_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"token id {bad} is outside the JTok table's vocabulary [0, {vocab_size}): the data was "
            f"tokenised with a larger vocabulary than model.vocab_size={vocab_size}; rebuild the data "
            f"or set model.vocab_size to at least {hi + 1}"
        )


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


@dataclass(frozen=True)
class LayerSlice:
    """The layers of the whole model a pipeline stage's table holds: [offset, offset + count) of ``total``.
    Stages hold equal counts (the config refuses uneven splits), so stage = offset / count."""

    offset: int
    count: int
    total: int

    @property
    def stage(self) -> int:
        return self.offset // self.count

    @property
    def num_stages(self) -> int:
        return self.total // self.count


class ReplicatedTokenTable(nn.Module):
    """The JTok tables of this stage's layers as one local parameter ``weight`` of shape [V, L, n_e, d].

    One row per token holds every layer's candidates, so a lookup is one gather of the unique ids.
    Gradients are dense over the table (as an unsharded model computes them) and reduced across
    data-parallel ranks like any other parameter. Under pipeline parallelism L is the stage's layer count
    (``layers``) and the checkpoint stores the stage's slice of the whole [V, L_total, n_e, d] table.
    """

    def __init__(
        self,
        vocab_size: int,
        num_layers: int,
        num_sets: int,
        hidden_size: int,
        seed: int = 1234,
        init_std: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        layers: LayerSlice | None = None,
    ):
        super().__init__()
        self.layers = layers if layers is not None else LayerSlice(0, num_layers, num_layers)
        if self.layers.count != num_layers:
            raise ValueError(f"num_layers={num_layers} differs from the stage's layer count {self.layers.count}")
        self.vocab_size, self.num_layers, self.num_sets, self.hidden_size = vocab_size, num_layers, num_sets, hidden_size
        self.seed, self.init_std = seed, init_std
        self.weight = nn.Parameter(
            torch.empty(vocab_size, num_layers, num_sets, hidden_size, dtype=dtype, device=device)
        )
        self.weight.jtok_table = True   # marks the parameter for the table's own optimizer group
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        perm = row_permutation(self.vocab_size, self.seed)
        sl = self.layers
        rows = init_rows_for_permuted_range(
            0, self.vocab_size, (sl.total, *self.weight.shape[2:]), self.seed, self.init_std, self.weight.dtype,
            layers=(sl.offset, sl.count),
        )
        self.weight[perm.to(self.weight.device)] = rows.to(self.weight.device)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """``weight`` as this stage's layers [offset, offset + L) of the global [V, L_total, n_e, d] tensor,
        replicated over tensor and data parallel ranks (the replica ids Megatron gives a plain parameter)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        sl = self.layers
        replica = (0, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True))
        return {f"{prefix}weight": ShardedTensor.from_rank_offsets(
            f"{prefix}weight", self.weight, (1, sl.stage, sl.num_stages), replica_id=replica)}

    def lookup(self, token_ids: Tensor) -> TokenRows:
        check_token_ids(token_ids, self.vocab_size)
        flat = token_ids.t().reshape(-1)     # [b, s] -> [s, b] order, matching the hidden states
        unique_ids, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        rows = F.embedding(unique_ids, self.weight.view(self.vocab_size, -1))
        rows = rows.view(-1, self.num_layers, self.num_sets, self.hidden_size)
        return TokenRows(unique_ids=unique_ids, unique_rows=rows, inverse=inverse)
