"""The deduplicated all-to-all exchange of token-table rows (forward) and row gradients (backward).

Per micro-batch (DESIGN.md, "The sharded token table"):

    token ids -> DedupPlan (unique ids, inverse index, split counts by owner)
      -> all_to_all_single(counts) -> all_to_all_single(ids)           small, synchronous
      -> owners gather their rows  -> all_to_all_single(rows)          the bulk: asynchronous
    backward: d(unique rows) -> all_to_all_single(grads)  (asynchronous) -> owners accumulate

Only ``all_to_all_single`` is used (NCCL and gloo both have it). A ``RowLookup`` walks through a small
state machine and asserts the call order, so a schedule bug (waiting twice, consuming rows before they
arrived, a second backward) fails loudly instead of corrupting the tables.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from jtok_kernels.ops import segment_sum
from jtok_train.parallel.placement import RowPlacement

__all__ = ["DedupPlan", "make_plan", "ExchangeStats", "SideStream", "CudaStreams", "RowLookup", "exchange_ids"]


@dataclass
class DedupPlan:
    """What one rank asks for in one micro-batch."""

    unique_ids: Tensor      # [U] ids to fetch (sorted unique ids; all positions' ids without dedup)
    inverse: Tensor         # [T] position -> index into unique_ids
    order: Tensor           # [U] indices into unique_ids, grouped by owner rank (the send order)
    send_counts: list[int]  # ids sent to each owner
    num_positions: int


def make_plan(flat_ids: Tensor, placement: RowPlacement, dedup: bool = True) -> DedupPlan:
    if dedup:
        unique_ids, inverse = torch.unique(flat_ids, sorted=True, return_inverse=True)
    else:
        unique_ids, inverse = flat_ids, torch.arange(flat_ids.numel(), device=flat_ids.device)
    owner = placement.owner(unique_ids.cpu())
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=placement.world_size).tolist()
    return DedupPlan(unique_ids, inverse, order.to(flat_ids.device), counts, flat_ids.numel())


@dataclass
class ExchangeStats:
    """Per-step counters (summed over the step's micro-batches, this rank)."""

    positions: int = 0
    unique_ids: int = 0
    rows_requested: int = 0          # rows this rank asked for (self included)
    rows_remote: int = 0             # of which owned by another rank
    rows_served: int = 0             # rows this rank gathered for requesters (self included)
    bytes_sent: int = 0              # ids + rows + gradients leaving this rank for other ranks
    bytes_received: int = 0
    wait_s: float = 0.0              # time compute waited on the exchange
    lookups: int = 0

    def as_metrics(self, prefix: str = "exchange/") -> dict[str, float]:
        d = {k: float(v) for k, v in self.__dict__.items()}
        d["unique_ratio"] = self.unique_ids / max(1, self.positions)
        return {prefix + k: v for k, v in d.items()}


class CudaStreams:
    """The CUDA stream calls the exchange makes, in one place (tests substitute a recording stand-in on CPU:
    jtok_train/testing/streams.py, which checks every cross-stream use for its hand-off)."""

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device=device)

    def current(self):
        return torch.cuda.current_stream()

    def use(self, stream):
        return torch.cuda.stream(stream)

    def wait(self, waiter, other) -> None:
        waiter.wait_stream(other)

    def record(self, tensor: Tensor, stream) -> None:
        tensor.record_stream(stream)


# Tests set this to a stand-in with CudaStreams' methods before building a table (then every SideStream uses it,
# on any device); None: CudaStreams on a CUDA device, no streams on CPU.
STREAMS_OVERRIDE = None


class SideStream:
    """Where the exchange runs: a CUDA side stream on GPU; on CPU the asynchrony comes from gloo's async
    work handles and this is a no-op.

    The stream discipline, every tensor that crosses between the streams goes through one of two calls:
    - ``run(*inputs)``: the block runs on the side stream after everything the compute stream enqueued so far
      (a wait), and ``inputs``, the compute stream's tensors the block reads, are recorded on the side stream
      (``record_stream``: the caching allocator must not hand their memory to a compute kernel while the side
      stream may still read it, even once the compute side has dropped them);
    - ``handoff(*tensors)``: the compute stream waits for the side stream, and ``tensors``, made on the side
      stream, are recorded on the compute stream before it reads them.
    Long-lived tensors (the shard) are passed too: recording costs nothing and keeps the rule uniform.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        api = STREAMS_OVERRIDE if STREAMS_OVERRIDE is not None else (CudaStreams() if device.type == "cuda" else None)
        self.api = api if enabled else None
        self.stream = self.api.new_stream(device) if self.api is not None else None

    @property
    def active(self) -> bool:
        return self.api is not None

    @contextmanager
    def run(self, *inputs: Tensor) -> Iterator[None]:
        if self.api is None:
            yield
            return
        api = self.api
        api.wait(self.stream, api.current())   # inputs were produced on the compute stream
        for t in inputs:
            api.record(t, self.stream)
        with api.use(self.stream):
            yield

    def handoff(self, *tensors: Tensor) -> None:
        if self.api is None:
            return
        api = self.api
        current = api.current()
        api.wait(current, self.stream)
        for t in tensors:
            api.record(t, current)   # the caching allocator must not reuse it while compute reads it


def _a2a(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group, async_op: bool):
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


def exchange_ids(plan: DedupPlan, placement: RowPlacement, group, bad_ids: str | None) -> tuple[list[int], Tensor]:
    """Counts then ids. A rank with invalid ids sends -1 counts, so every rank raises instead of hanging."""
    world = placement.world_size
    device = plan.unique_ids.device
    counts = torch.tensor(plan.send_counts if bad_ids is None else [-1] * world, dtype=torch.int64, device=device)
    recv = torch.empty(world, dtype=torch.int64, device=device)
    _a2a(recv, counts, [1] * world, [1] * world, group, async_op=False)
    recv_counts = recv.tolist()  # host split sizes (on CUDA this syncs the side stream only)
    if bad_ids is not None:
        raise ValueError(bad_ids)
    if any(c < 0 for c in recv_counts):
        peers = [r for r, c in enumerate(recv_counts) if c < 0]
        raise ValueError(f"token ids outside the vocabulary on rank(s) {peers} of the embedding-parallel group "
                         f"(see that rank's error); no rows were exchanged")
    send_ids = plan.unique_ids.index_select(0, plan.order)
    recv_ids = torch.empty(sum(recv_counts), dtype=send_ids.dtype, device=device)
    _a2a(recv_ids, send_ids, recv_counts, plan.send_counts, group, async_op=False)
    return recv_counts, recv_ids


class RowLookup:
    """One micro-batch's exchange. States: started -> rows_ready -> grads_sent -> done."""

    def __init__(
        self,
        plan: DedupPlan,
        placement: RowPlacement,
        group,
        rank: int,
        shard: Tensor,
        stream: SideStream,
        stats: ExchangeStats,
        bad_ids: str | None = None,
    ):
        self.plan, self.placement, self.group, self.rank = plan, placement, group, rank
        self.stream, self.stats = stream, stats
        self.state = "new"
        row_shape = tuple(shard.shape[1:])
        self.row_bytes = shard.element_size() * int(torch.tensor(row_shape).prod())
        # compute -> side: the plan (made on the compute stream) and the shard (the optimizer writes it there)
        with stream.run(plan.unique_ids, plan.order, shard):
            self.recv_counts, self.recv_ids = exchange_ids(plan, placement, group, bad_ids)
            served = shard.index_select(0, placement.local_row(self.recv_ids.cpu()).to(shard.device))
            self.rows = torch.empty((len(plan.unique_ids), *row_shape), dtype=shard.dtype, device=shard.device)
            self.work = _a2a(self.rows, served, plan.send_counts, self.recv_counts, group, async_op=True)
            self._served = served   # keep the send buffer alive until the collective completed
        remote_req = sum(c for r, c in enumerate(plan.send_counts) if r != rank)
        remote_srv = sum(c for r, c in enumerate(self.recv_counts) if r != rank)
        id_bytes = plan.unique_ids.element_size()
        stats.positions += plan.num_positions
        stats.unique_ids += len(plan.unique_ids)
        stats.rows_requested += len(plan.unique_ids)
        stats.rows_remote += remote_req
        stats.rows_served += len(self.recv_ids)
        stats.bytes_sent += remote_req * id_bytes + remote_srv * self.row_bytes
        stats.bytes_received += remote_srv * id_bytes + remote_req * self.row_bytes
        stats.lookups += 1
        self.state = "started"

    def _expect(self, state: str, action: str) -> None:
        if self.state != state:
            raise RuntimeError(f"token-row exchange: cannot {action} in state {self.state!r} (expected {state!r})")

    def wait_rows(self) -> Tensor:
        """Rows of the unique ids [U, ...] in unique-id order (on the compute stream)."""
        self._expect("started", "wait for rows")
        t0 = time.perf_counter()
        self.work.wait()
        self.stats.wait_s += time.perf_counter() - t0
        # side -> compute: the received rows, and the requesters' ids (read again when gradients are added)
        self.stream.handoff(self.rows, self.recv_ids)
        rows = torch.empty_like(self.rows)
        rows[self.plan.order] = self.rows          # owner-grouped order -> unique-id order
        self.work, self._served, self.rows = None, None, None
        self.state = "rows_ready"
        return rows

    def send_grads(self, grad_rows: Tensor, scale: float) -> None:
        """Start sending d(unique rows) [U, ...] back to their owners (asynchronous)."""
        self._expect("rows_ready", "send gradients")
        # compute -> side: autograd's row gradients (freed by autograd once this returns) and the send order
        with self.stream.run(grad_rows, self.plan.order):
            send = (grad_rows.index_select(0, self.plan.order) * scale).contiguous()
            self.grad_recv = torch.empty((len(self.recv_ids), *send.shape[1:]), dtype=send.dtype, device=send.device)
            self.work = _a2a(self.grad_recv, send, self.recv_counts, self.plan.send_counts, self.group, async_op=True)
            self._sent = send
        remote_req = sum(c for r, c in enumerate(self.plan.send_counts) if r != self.rank)
        remote_srv = sum(c for r, c in enumerate(self.recv_counts) if r != self.rank)
        self.stats.bytes_sent += remote_req * self.row_bytes
        self.stats.bytes_received += remote_srv * self.row_bytes
        self.state = "grads_sent"

    def accumulate_grads(self, shard_grad: Tensor) -> None:
        """Wait for the gradients this rank owns and add them to its shard's gradient."""
        self._expect("grads_sent", "accumulate gradients")
        t0 = time.perf_counter()
        self.work.wait()
        self.stats.wait_s += time.perf_counter() - t0
        self.stream.handoff(self.grad_recv)   # side -> compute: the gradients received for owned rows
        rows = self.placement.local_row(self.recv_ids.cpu()).to(shard_grad.device)
        # An owned row is asked for by up to W requesters: sum its gradients per row first, in a fixed order
        # (segment_sum: a deterministic kernel on GPU, where index_add_ with repeated rows uses atomics), then
        # add each row once.
        uniq, inv = torch.unique(rows, return_inverse=True)
        grads = self.grad_recv.to(shard_grad.dtype).reshape(len(rows), -1)
        summed = segment_sum(grads, inv, len(uniq)).view(len(uniq), *shard_grad.shape[1:])
        shard_grad.index_add_(0, uniq, summed)
        self.work, self._sent, self.grad_recv = None, None, None
        self.state = "done"


class _ExchangedRows(torch.autograd.Function):
    """Identity on the fetched rows whose backward sends the row gradients to their owners."""

    @staticmethod
    def forward(ctx, anchor: Tensor, rows: Tensor, send: Callable[[Tensor], None]) -> Tensor:
        ctx.send = send
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.send(grad.contiguous())
        return None, None, None


def rows_with_grad_exchange(anchor: Tensor, rows: Tensor, send: Callable[[Tensor], None]) -> Tensor:
    return _ExchangedRows.apply(anchor, rows, send)
