"""What every token-row provider shares: the rows a micro-batch needs (``TokenRows``), the provider
interface (``TokenRowProvider``; ``check_provider`` verifies a provider against it), the hand-off from the
model to its layers, the layers a pipeline stage holds, and the steps every provider takes on a micro-batch's
ids (positions in the hidden states' order, the vocabulary check, dedup).

A provider turns a micro-batch's token ids into ``TokenRows``: the rows of every layer for the *unique* ids,
plus the inverse index from positions to unique ids. The layers only ever see ``TokenRows``; whether the table
is replicated (``replicated.py``), row-sharded across ranks with an all-to-all exchange (``sharded.py``) or
kept in host memory for inference (``host.py``) is the provider's business.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TokenRows",
    "TokenRowProvider",
    "check_provider",
    "provider_errors",
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
    """What a JTok model and the training loop ask of a token table: the interface every provider implements
    (``ReplicatedTokenTable``, ``ShardedTokenTable``, ``HostTokenTable``; ``check_provider`` verifies a class or
    an instance against it, names and signatures, and the model builder and the train module call it on every
    provider they are given).

    Per micro-batch: ``prefetch`` (when the data iterator hands the previous micro-batch to the schedule, or
    before a generation forward), ``lookup`` (at the model's forward), ``advance`` (after the forward). Per
    training step, in this order, by the train module's joint optimizer, on every provider: ``zero_grad``
    (before the forward-backward schedule), ``finish_backward`` (after it), ``grad_norm_sq`` (joins
    Megatron's norm: one clipping coefficient), ``scale_grad`` (when that coefficient is below 1), ``step``.
    These hooks are about the gradient a provider holds *outside* the model's parameters: a provider whose
    rows are a model parameter (the replicated table: Megatron's DDP reduces its gradient, Megatron's
    optimizer clips and steps it) implements them as no-ops and reports a norm of 0. ``state`` is what a
    checkpoint holds of the provider; ``pop_stats`` its counters for the step's metrics.
    """

    num_layers: int    # the layers whose rows it holds (a pipeline stage's)
    num_sets: int      # n_e: candidate rows per layer (1 for JTok)
    hidden_size: int
    vocab_size: int

    @property
    def has_own_optimizer(self) -> bool:
        """Whether its rows are outside Megatron's optimizer (not model parameters): the train module then gives
        it a ``ShardedTableOptimizer`` (``jtok.table_optimizer``, the table group's LR and weight decay),
        which ``step`` runs. False: the rows are a model parameter, stepped with the backbone."""
        ...

    def lookup(self, token_ids: Tensor) -> TokenRows:
        """token_ids: [b, s] -> the rows for the micro-batch's positions. Called by the model at the start of
        its forward; with autograd on, the rows are connected to the provider's gradient."""
        ...

    def prefetch(self, token_ids: Tensor) -> None:
        """Announce the micro-batch of a coming ``lookup`` (its [b, s] ids, as the caller has them: the host
        batch in training, which a provider that plans on the host needs; a device batch is read back), so
        that its rows can start moving early. Called one micro-batch ahead by the train module's data
        iterator and before each forward by ``generate``; lookups then consume prefetches in order."""
        ...

    def advance(self) -> None:
        """Called by the model after it enqueued a forward: move a prefetched lookup on (its rows can travel
        while the device computes)."""
        ...

    def finish_backward(self) -> None:
        """After the step's forward-backward schedule (also on a step that is then skipped): collect every
        row gradient of the step into the gradient the provider holds."""
        ...

    def zero_grad(self) -> None:
        """Before the step's forward-backward schedule: clear the gradient the provider holds."""
        ...

    def grad_norm_sq(self) -> float:
        """The squared L2 norm of the gradient the provider holds, over the whole table (every rank returns the
        same value: collective where the table is split). Added to Megatron's squared norm for the step's one
        clipping coefficient."""
        ...

    def scale_grad(self, coeff: float) -> None:
        """Multiply the gradient the provider holds by ``coeff`` (the joint clipping coefficient, when below 1)."""
        ...

    def step(self, lr: float) -> None:
        """Apply the step's update to the rows the provider holds outside the model's parameters, at learning
        rate ``lr`` (the table group's). Called after Megatron's optimizer step, on applied steps only."""
        ...

    def state(self, prefix: str = "") -> dict:
        """What a checkpoint holds of the provider's rows: a Megatron sharded state dict (ShardedTensors with
        global shapes and offsets, keys starting with ``prefix``), so a checkpoint reshards to another
        world size. An ``nn.Module`` provider's ``sharded_state_dict`` returns it: the checkpoint saves it with
        the model (``<model prefix>token_table.``), and a resume loads the same keys back through the model's
        ``load_state_dict``. The state of a provider's own optimizer (the sharded table's moments) is the
        optimizer's, saved as a checkpoint component (``TrainModule.checkpoint_components``)."""
        ...

    def pop_stats(self) -> dict[str, float]:
        """What the provider counted since the previous call (metric name -> value; ``{}`` when it counts
        nothing), and start counting afresh: the step's metrics in training, ``GenerationOutput.transfer``
        in generation."""
        ...


@functools.cache
def _protocol_members() -> tuple[dict[str, inspect.Signature], tuple[str, ...], tuple[str, ...]]:
    """(method -> its signature without ``self``, properties, instance attributes) of ``TokenRowProvider``."""
    methods, properties = {}, []
    for name, value in vars(TokenRowProvider).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            properties.append(name)
        elif inspect.isfunction(value):
            sig = inspect.signature(value)
            methods[name] = sig.replace(parameters=list(sig.parameters.values())[1:])
    attributes = tuple(n for n in TokenRowProvider.__annotations__ if not n.startswith("_"))
    return methods, tuple(properties), attributes


def _signature_of(provider: Any, name: str) -> "inspect.Signature | None":
    """The signature a call sees (without ``self``), or None where Python cannot tell (a builtin)."""
    try:
        if isinstance(provider, type):
            raw = inspect.getattr_static(provider, name)
            if isinstance(raw, staticmethod):
                return inspect.signature(raw.__func__)
            if inspect.isfunction(raw):
                sig = inspect.signature(raw)
                return sig.replace(parameters=list(sig.parameters.values())[1:])
        return inspect.signature(getattr(provider, name))   # bound: no self
    except (TypeError, ValueError):
        return None


def _incompatible(want: inspect.Signature, got: inspect.Signature) -> str | None:
    """Why a method with signature ``got`` cannot take the calls the Protocol's ``want`` allows (each parameter
    by position and by name, the optional ones omitted), or None."""
    params = list(want.parameters.values())
    n_req = sum(p.default is inspect.Parameter.empty for p in params)
    x = object()
    calls = [((x,) * n_req, {}), ((), {p.name: x for p in params[:n_req]})]
    for i, p in enumerate(params[n_req:], n_req):
        calls += [((x,) * (i + 1), {}), ((x,) * n_req, {p.name: x})]
    for args, kwargs in calls:
        try:
            got.bind(*args, **kwargs)
        except TypeError as e:
            return f"takes {_plain(got)} where TokenRowProvider's takes {_plain(want)} ({e})"
    return None


def _plain(sig: inspect.Signature) -> str:
    """A signature's parameters without annotations: ``(token_ids)``, ``(prefix='')``."""
    return str(sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
                           return_annotation=inspect.Signature.empty))


def provider_errors(provider: Any) -> list[str]:
    """What ``provider`` (a class, or an instance, whose instance attributes are then checked too) lacks of
    ``TokenRowProvider``: one line per missing member, then one per incompatible member (empty when it is
    complete). A member inherited from the Protocol's own declaration (a class that subclasses it without
    implementing it) counts as missing."""
    cls = provider if isinstance(provider, type) else type(provider)
    where = f"{cls.__module__}.{cls.__qualname__}"
    methods, properties, attributes = _protocol_members()
    own = vars(TokenRowProvider)
    missing, wrong = [], []
    for name in (*properties, *methods):
        if not hasattr(provider, name) or inspect.getattr_static(cls, name, None) is own.get(name):
            missing.append(f"{where} is not a token-row provider: it lacks {name} (jtok_train.tables.rows."
                           "TokenRowProvider)")
        elif name in properties and inspect.isfunction(inspect.getattr_static(cls, name)):
            wrong.append(f"{where}.{name} is a method where TokenRowProvider declares a property (or attribute)")
        elif name in methods:
            sig = _signature_of(provider, name)
            why = _incompatible(methods[name], sig) if sig is not None else None
            if why is not None:
                wrong.append(f"{where}.{name} {why}")
    if not isinstance(provider, type):
        missing += [f"{where} is not a token-row provider: its instance lacks the attribute {name} (jtok_train."
                    "tables.rows.TokenRowProvider)" for name in attributes if not hasattr(provider, name)]
    return missing + wrong


def check_provider(provider: Any) -> None:
    """Raise ``TypeError`` (one line: the class and its first missing or incompatible member) unless
    ``provider`` (a class or an instance) implements every member of ``TokenRowProvider`` with a compatible
    signature. The model builder and the train module call it on every provider they are given."""
    errors = provider_errors(provider)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise TypeError(errors[0] + more)


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
