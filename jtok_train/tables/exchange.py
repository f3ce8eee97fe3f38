"""The deduplicated all-to-all exchange of token-table rows (forward) and row gradients (backward).

Per micro-batch (DESIGN.md, "The sharded token table"):

    host token ids -> DedupPlan on the host (unique ids, inverse index, owners, split counts; numpy)
      -> all_to_all_single(counts), all_to_all_single(ids)     small, on a host (gloo) group: no device sync
      -> owners gather their rows  -> all_to_all_single(rows)  the bulk, on the device group: asynchronous
    backward: d(unique rows) -> all_to_all_single(grads)  (asynchronous) -> owners accumulate

Nothing in this path reads a device tensor back to the host: the plan is built from the host batch before its
copy to the device, the counts and ids travel between hosts, and the owner-side indices (which shard rows each
requester asked for, and their unique set for the gradient sum) are computed once per lookup on the host and
reused by the backward. ``tests/distributed/test_sharded_table.py`` counts device reads in this path (0).

A lookup runs in three phases: ``start`` (plan, counts sent; at the prefetch of micro-batch i + 1, before
forward i), ``advance`` (counts and ids received, rows gathered and sent), ``wait_rows`` (at the lookup of
i + 1). With a CUDA side stream ``advance`` runs when the model has enqueued forward i (the host waits for the
ids while the device computes, never before it enqueues); on CPU, where the host computes itself, right after
``start`` (the rows then travel during forward i): ``ShardedTokenTable.DEFER_ROWS``. Only ``all_to_all_single`` is used (NCCL and gloo both have it). A
``RowLookup`` walks through a small state machine and asserts the call order, so a schedule bug (waiting twice,
consuming rows before they arrived, a second backward) fails loudly instead of corrupting the tables.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from jtok_kernels.ops import segment_sum
from jtok_train.tables.placement import RowPlacement

__all__ = ["DedupPlan", "make_plan", "host_ids", "ExchangeStats", "SideStream", "CudaStreams", "RowLookup"]


@dataclass
class DedupPlan:
    """What one rank asks for in one micro-batch: built on the host (numpy), with the device copies the
    compute needs made once.

    The rows arrive grouped by owner (an all-to-all's output is), and the plan hands them to the layers in
    that order: ``unique_ids`` and ``inverse`` are made for it on the host, so no pass over the [U, L, n_e, d]
    rows puts them back in id order (forward) or their gradient in owner order (backward). Every row's values
    and gradient are the same whatever its place in the buffer, so the order changes no result."""

    host_unique_ids: np.ndarray   # [U] ids to fetch, sorted (all positions' ids without dedup)
    host_order: np.ndarray        # [U] indices into host_unique_ids, grouped by owner rank (the send order)
    host_position: np.ndarray     # [U] the place of host_unique_ids[j] in the send order (host_order's inverse)
    send_counts: list[int]        # ids sent to each owner
    num_positions: int
    unique_ids: Tensor            # device copies: the ids in the send order (the rows' order) and the inverse
    inverse: Tensor               # index [T] (position -> index into unique_ids)

    @property
    def host_send_ids(self) -> np.ndarray:
        return np.ascontiguousarray(self.host_unique_ids[self.host_order], dtype=np.int64)


def host_ids(ids: "Tensor | np.ndarray") -> np.ndarray:
    """A host batch's token ids as numpy (a CPU tensor's view, no copy). A device tensor is refused: the plan
    must be built before the batch is copied to the device (reading it back would stall the host)."""
    if isinstance(ids, np.ndarray):
        return ids
    if ids.device.type != "cpu":
        raise ValueError(f"the exchange plans on the host: pass the micro-batch's token ids before their copy to "
                         f"{ids.device} (got a {ids.device.type} tensor)")
    return ids.numpy()


def make_plan(flat_ids: "Tensor | np.ndarray", placement: RowPlacement, dedup: bool = True,
              device: "torch.device | str" = "cpu") -> DedupPlan:
    """The plan of one micro-batch from its host ids (positions in the hidden states' [s, b] order)."""
    ids = host_ids(flat_ids)
    if dedup:
        unique_ids, inverse = np.unique(ids, return_inverse=True)   # sorted, as torch.unique(sorted=True)
    else:
        unique_ids, inverse = ids, np.arange(ids.size)
    owner = placement.owner_host(unique_ids)
    order = np.argsort(owner, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    counts = np.bincount(owner, minlength=placement.world_size).tolist()
    dev = torch.device(device)

    def to_dev(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev, non_blocking=True)

    return DedupPlan(unique_ids, order, position, counts, int(ids.size), to_dev(unique_ids[order]),
                     to_dev(position[inverse.reshape(-1)]))


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
    hot_hits: int = 0                # ids served from this rank's replicas of the hot rows (parallel.hot_rows)
    hot_reduce_bytes: int = 0        # bytes of the replicas' gradient all-reduced (the buffer; a ring moves ~2x)
    # The overlap, by the order of events (``EVENT_CLOCK``), which no machine load can change: lookups whose
    # exchange was started before the compute that precedes them began (the previous micro-batch's lookup in
    # the step), and lookups whose rows were already on their way when the compute asked for them. With
    # overlap on, every lookup but a step's first is ahead; with it off, none is.
    lookups_ahead: int = 0
    lookups_in_flight: int = 0

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


# One process-wide sequence of exchange events (counts sent, rows sent, rows asked for): comparing two events'
# numbers tells which came first.
EVENT_CLOCK = itertools.count()


def _a2a(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group, async_op: bool):
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


def _host_a2a(out: np.ndarray, inp: np.ndarray, out_splits: list[int], in_splits: list[int], group):
    """An all-to-all of host (numpy) buffers on the host group, started asynchronously; the result lands in
    ``out`` (torch's views of the numpy memory, so nothing is read back through a tensor)."""
    return dist.all_to_all_single(torch.from_numpy(out), torch.from_numpy(inp), out_splits, in_splits,
                                  group=group, async_op=True)


class RowLookup:
    """One micro-batch's exchange. States: ids_sent -> rows_sent -> rows_ready -> grads_sent -> done.

    ``group``: the device group the rows and row gradients travel on; ``id_group``: a host (gloo) group over the
    same ranks for the counts and ids (the same group on CPU)."""

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
        id_group=None,
    ):
        self.plan, self.placement, self.group, self.rank = plan, placement, group, rank
        self.id_group = id_group if id_group is not None else group
        self.shard, self.stream, self.stats, self.bad_ids = shard, stream, stats, bad_ids
        self.state = "new"
        row_shape = tuple(shard.shape[1:])
        self.row_bytes = shard.element_size() * int(np.prod(row_shape))
        world = placement.world_size
        # a rank with invalid ids sends -1 counts, so every rank raises instead of hanging
        self._send_counts = np.array(plan.send_counts if bad_ids is None else [-1] * world, dtype=np.int64)
        self._recv_counts = np.empty(world, dtype=np.int64)
        self.work = _host_a2a(self._recv_counts, self._send_counts, [1] * world, [1] * world, self.id_group)
        self.started_at, self.rows_sent_at = next(EVENT_CLOCK), None
        self.state = "ids_sent"

    def _expect(self, state: str, action: str) -> None:
        if self.state != state:
            raise RuntimeError(f"token-row exchange: cannot {action} in state {self.state!r} (expected {state!r})")

    def advance(self) -> None:
        """Receive the counts and the ids asked of this rank, gather those rows and start sending them. The
        owner-side indices are kept for the backward. Nothing here waits on the device."""
        self._expect("ids_sent", "advance")
        plan, placement = self.plan, self.placement
        t0 = time.perf_counter()
        self.work.wait()
        recv_counts = self._recv_counts.tolist()
        if self.bad_ids is not None:
            raise ValueError(self.bad_ids)
        if any(c < 0 for c in recv_counts):
            peers = [r for r, c in enumerate(recv_counts) if c < 0]
            raise ValueError(f"token ids outside the vocabulary on rank(s) {peers} of the embedding-parallel group "
                             f"(see that rank's error); no rows were exchanged")
        self.recv_counts = recv_counts
        send_ids = plan.host_send_ids
        recv_ids = np.empty(sum(recv_counts), dtype=np.int64)
        _host_a2a(recv_ids, send_ids, recv_counts, plan.send_counts, self.id_group).wait()
        self.stats.wait_s += time.perf_counter() - t0
        self.recv_ids = recv_ids
        # owner side, once: the shard rows each requester asked for, and their unique set for the gradient sum
        local = placement.local_row_host(recv_ids)
        uniq, inv = np.unique(local, return_inverse=True)
        dev = self.shard.device
        self.served_rows = torch.from_numpy(local).to(dev, non_blocking=True)
        self.grad_rows = torch.from_numpy(uniq).to(dev, non_blocking=True)
        self.grad_segments = torch.from_numpy(inv.reshape(-1)).to(dev, non_blocking=True)
        self.touched_rows, self.host_touched_rows = self.grad_rows, uniq
        shard, row_shape = self.shard, tuple(self.shard.shape[1:])
        # compute -> side: the device indices (copied on the compute stream) and the shard (the optimizer writes
        # it there)
        with self.stream.run(self.served_rows, shard):
            served = shard.index_select(0, self.served_rows)
            self.rows = torch.empty((len(plan.host_unique_ids), *row_shape), dtype=shard.dtype, device=dev)
            self.work = _a2a(self.rows, served, plan.send_counts, recv_counts, self.group, async_op=True)
            self._served = served   # keep the send buffer alive until the collective completed
        self.rows_sent_at = next(EVENT_CLOCK)
        stats = self.stats
        remote_req = sum(c for r, c in enumerate(plan.send_counts) if r != self.rank)
        remote_srv = sum(c for r, c in enumerate(recv_counts) if r != self.rank)
        id_bytes = 8
        stats.positions += plan.num_positions
        stats.unique_ids += len(plan.host_unique_ids)
        stats.rows_requested += len(plan.host_unique_ids)
        stats.rows_remote += remote_req
        stats.rows_served += len(recv_ids)
        stats.bytes_sent += remote_req * id_bytes + remote_srv * self.row_bytes
        stats.bytes_received += remote_srv * id_bytes + remote_req * self.row_bytes
        stats.lookups += 1
        self.state = "rows_sent"

    def wait_rows(self) -> Tensor:
        """Rows of the unique ids [U, ...] in the plan's order (``plan.unique_ids``; on the compute stream)."""
        if self.state == "ids_sent":
            self.advance()
        self._expect("rows_sent", "wait for rows")
        t0 = time.perf_counter()
        self.work.wait()
        self.stats.wait_s += time.perf_counter() - t0
        # side -> compute: the received rows
        self.stream.handoff(self.rows)
        rows = self.rows      # in the send order, which the plan's ids and inverse index follow
        self.work, self._served, self.rows = None, None, None
        self.state = "rows_ready"
        return rows

    def send_grads(self, grad_rows: Tensor, scale: float) -> None:
        """Start sending d(unique rows) [U, ...] back to their owners (asynchronous)."""
        self._expect("rows_ready", "send gradients")
        # compute -> side: autograd's row gradients (freed by autograd once this returns), already in the send
        # order. Scaled before the owners' sum, as Megatron's DDP scales before its all-reduce.
        with self.stream.run(grad_rows):
            send = grad_rows.contiguous() if scale == 1.0 else grad_rows * scale
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
        # An owned row is asked for by up to W requesters: sum its gradients per row first, in a fixed order
        # (segment_sum: a deterministic kernel on GPU, where index_add_ with repeated rows uses atomics), then
        # add each row once. The rows and segments were computed on the host at advance().
        n = len(self.recv_ids)
        grads = self.grad_recv.to(shard_grad.dtype).reshape(n, shard_grad[0].numel())   # n may be 0 (hot rows)
        summed = segment_sum(grads, self.grad_segments, len(self.grad_rows)).view(len(self.grad_rows),
                                                                                    *shard_grad.shape[1:])
        shard_grad.index_add_(0, self.grad_rows, summed)
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
