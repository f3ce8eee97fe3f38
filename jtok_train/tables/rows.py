"""What every token-row provider shares: the rows a micro-batch needs (``TokenRows``), the provider
interface, the hand-off from the model to its layers, the layers a pipeline stage holds, and the steps every
provider takes on a micro-batch's ids (positions in the hidden states' order, the vocabulary check, dedup).

A provider turns a micro-batch's token ids into ``TokenRows``: the rows of every layer for the *unique* ids,
plus the inverse index from positions to unique ids. The layers only ever see ``TokenRows``; whether the table
is replicated (``replicated.py``), row-sharded across ranks with an all-to-all exchange (``sharded.py``) or
kept in host memory for inference (``host.py``) is the provider's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TokenRows",
    "TokenRowProvider",
    "TokenRowsContext",
    "ReplayGradSink",
    "RowGradJoin",
    "LayerSlice",
    "positions",
    "dedup",
    "vocabulary_error",
    "check_token_ids",
]


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

    unique_ids: Tensor    # [U] the unique token ids, in the provider's order (sorted, or grouped by owner rank)
    unique_rows: Tensor   # [U, L, n_e, d] rows of every layer of this stage (autograd-connected)
    inverse: Tensor       # [T] position -> index into unique_ids
    replay_sink: "ReplayGradSink | None" = None   # set when the layers may be replayed by full recompute
    _layers: "tuple[Tensor, ...] | None" = field(default=None, init=False, repr=False, compare=False)

    def layer(self, index: int) -> Tensor:
        """Rows of one layer (0-based index within the stage): [U, n_e, d].

        With autograd the L layers' rows are one ``unbind`` of the buffer, made once per micro-batch: its
        backward stacks the L gradients into the [U, L, n_e, d] gradient in one pass. Indexing ``[:, i]`` per
        layer would give every layer a backward that zero-fills a whole [U, L, n_e, d] gradient and adds it to
        the others': L full-size fills and adds per micro-batch, quadratic in the layers (the results are the
        same bitwise: each entry of the gradient is one layer's gradient or zero either way)."""
        if not (torch.is_grad_enabled() and self.unique_rows.requires_grad):
            return self.unique_rows[:, index]
        if self._layers is None:
            self._layers = self.unique_rows.unbind(1)
        return self._layers[index]


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


def positions(token_ids: "Tensor | np.ndarray", sequence_shard: tuple[int, int] | None = None) -> "Tensor | np.ndarray":
    """Token ids [b, s] -> the flat ids of the positions in the hidden states' [s, b] order (Megatron's), for a
    tensor or a host (numpy) array. ``sequence_shard=(rank, size)``: under sequence parallelism only this
    tensor-parallel rank's slice of the sequence."""
    b, s = token_ids.shape
    flat = np.ascontiguousarray(token_ids.T) if isinstance(token_ids, np.ndarray) else token_ids.t()
    if sequence_shard is not None:
        r, n = sequence_shard
        if s % n:
            raise ValueError(f"sequence length {s} is not divisible by the tensor-parallel size {n}")
        flat = flat[r * (s // n) : (r + 1) * (s // n)]
    return flat.reshape(-1)


def dedup(flat_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(sorted unique ids, inverse: position -> index into them)."""
    return torch.unique(flat_ids, sorted=True, return_inverse=True)


def vocabulary_error(token_ids: "Tensor | np.ndarray", vocab_size: int, where: str = "") -> str | None:
    """The one-line error for ids outside [0, vocab_size), or None when every id is inside (reads the ids:
    call it on host ids where the device must not be synchronised)."""
    empty = token_ids.size == 0 if isinstance(token_ids, np.ndarray) else token_ids.numel() == 0
    if empty:
        return None
    lo, hi = int(token_ids.min()), int(token_ids.max())
    if lo >= 0 and hi < vocab_size:
        return None
    bad = lo if lo < 0 else hi
    return (f"token id {bad} is outside the JTok table's vocabulary [0, {vocab_size}){where}: the data was "
            f"tokenised with a larger vocabulary than model.vocab_size={vocab_size}; rebuild the data "
            f"or set model.vocab_size to at least {hi + 1}")


def check_token_ids(token_ids: "Tensor | np.ndarray", vocab_size: int) -> None:
    """Raise the clear error for ids outside [0, vocab_size) (before any gather or collective)."""
    msg = vocabulary_error(token_ids, vocab_size)
    if msg is not None:
        raise ValueError(msg)
