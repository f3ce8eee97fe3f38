"""Row-sharded JTok tables behind the same provider interface as the replicated table.

Rank r of the embedding-parallel (EmbP) group stores only its block of rows, ``shard`` of shape
[block, L, n_e, d] (one row per token holds every layer's candidates, so one request per unique id
fetches everything the micro-batch needs). No rank ever allocates the full table, and the initial
values are those of the replicated table (both are defined per token by ``init_rows_for_permuted_range``).

The shard is not an ``nn.Parameter`` of the model: Megatron's DDP must not all-reduce it and Megatron's
optimizer must not step it. Its gradient arrives through the exchange, and ``ShardedTableOptimizer``
steps it (clipped jointly with the backbone by the trainer).

Overlap: ``prefetch(host ids)`` starts a micro-batch's exchange early (ids are known on the host before the
forward), ``advance()`` (called by the model after each forward) sends its rows, ``lookup(ids)`` consumes it;
without a prefetch the exchange runs synchronously at the lookup.

Hot rows (``hot_ids``, ``parallel.hot_rows``): replicas of the most frequent ids' rows on every rank, served
locally; only the other ids are exchanged (``jtok_train/tables/hot.py``).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import Tensor, nn

from jtok_train.tables.exchange import (
    EVENT_CLOCK,
    ExchangeStats,
    RowLookup,
    SideStream,
    host_ids,
    make_plan,
    rows_with_grad_exchange,
)
from jtok_train.tables.hot import HotRows
from jtok_train.tables.init import init_rows_for_permuted_range
from jtok_train.tables.placement import RowPlacement
from jtok_train.tables.rows import LayerSlice, TokenRows, positions, vocabulary_error

__all__ = ["ShardedTokenTable"]


class ShardedTokenTable(nn.Module):
    has_own_optimizer = True
    # When a prefetched exchange sends its rows. Deferred (to ``advance``, after the model enqueued the previous
    # micro-batch's forward) where the compute runs asynchronously to the host, on a CUDA stream: the host then
    # waits for the ids while the device computes, instead of before it enqueues the forward. Right away (at
    # ``prefetch``) where the host computes itself (CPU): the rows then travel during the previous forward, and
    # a second wait per micro-batch would expose the ranks' imbalance (measured, BENCHMARKS.md). None: by the
    # device (deferred with a side stream); tests set it to run the other order on CPU.
    DEFER_ROWS: bool | None = None

    def __init__(
        self,
        vocab_size: int,
        num_layers: int,
        num_sets: int,
        hidden_size: int,
        group: Any,
        seed: int = 1234,
        init_std: float = 1.0,
        dedup: bool = True,
        overlap: bool = True,
        grad_scale: float = 1.0,
        sequence_shard: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layers: LayerSlice | None = None,
        pipeline_group: Any = None,
        id_group: Any = None,
        hot_ids: "np.ndarray | list[int] | None" = None,
    ):
        """group: the EmbP process group (the ranks of this pipeline stage). grad_scale: factor on every row
        gradient sent (1/DP size, as Megatron's DDP averages the backbone's gradients). sequence_shard:
        (tp_rank, tp_size) under sequence parallelism, where each TP rank serves its own slice of the
        sequence. layers: the pipeline stage's layers of the whole model (their rows only are stored);
        pipeline_group: the ranks holding the same rows of the other stages' layers (for the global norm).
        id_group: a host (gloo) group over the same ranks as ``group`` for the counts and ids (default: ``group``,
        which is gloo on CPU). hot_ids: token ids whose rows every rank of the group replicates (module docstring;
        collective when not empty: the replicas are filled from their owners)."""
        super().__init__()
        self.layers = layers if layers is not None else LayerSlice(0, num_layers, num_layers)
        if self.layers.count != num_layers:
            raise ValueError(f"num_layers={num_layers} differs from the stage's layer count {self.layers.count}")
        self.pipeline_group = pipeline_group
        self.vocab_size, self.num_layers, self.num_sets, self.hidden_size = vocab_size, num_layers, num_sets, hidden_size
        self.group = group
        self.id_group = id_group if id_group is not None else group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.placement = RowPlacement(vocab_size, self.world, seed)
        self.dedup, self.overlap, self.grad_scale = dedup, overlap, grad_scale
        self.sequence_shard = sequence_shard
        self.start_row, self.stop_row = self.placement.owned_range(self.rank)
        device = torch.device(device)
        row_shape = (num_layers, num_sets, hidden_size)
        self.shard = torch.zeros((self.placement.block, *row_shape), dtype=dtype, device=device)
        init_rows_for_permuted_range(self.start_row, self.stop_row, (self.layers.total, *row_shape[1:]), seed,
                                     init_std, out=self.shard[: self.stop_row - self.start_row],
                                     layers=(self.layers.offset, self.layers.count))
        self.shard_grad = torch.zeros_like(self.shard)
        self.touched = torch.zeros(self.placement.block, dtype=torch.bool, device=device)  # rows with a gradient this step
        # the same on the host, from the owner-side indices the exchange computed there: which rows the step
        # touched is known without reading the device
        self._touched_host = np.zeros(self.placement.block, dtype=bool)
        self._touched_rows: Tensor | None = None
        # A zero-size leaf that makes the fetched rows part of the autograd graph.
        self._anchor = torch.zeros(0, requires_grad=True, device=device)
        self.stream = SideStream(device, enabled=overlap)
        self.stats = ExchangeStats()
        self._prefetched: deque[tuple[np.ndarray, RowLookup | None]] = deque()
        self._in_backward: deque[RowLookup] = deque()
        self.deferred_sends = 0   # exchanges whose rows advance() sent (DEFER_ROWS)
        self._previous_lookup_at: int | None = None   # EVENT_CLOCK at this step's previous lookup
        # what ``step`` runs: the ShardedTableOptimizer built over this table (it attaches itself)
        self.optimizer: Any = None
        hot = np.unique(np.asarray(hot_ids if hot_ids is not None else [], dtype=np.int64).reshape(-1))
        self.hot_rows = HotRows(hot, vocab_size, self.placement.position_of_host, (self.start_row, self.stop_row),
                                self.shard, group, self.id_group, grad_scale) if hot.size else None

    # -- hot rows (jtok_train/tables/hot.py) ----------------------------------------------------------
    @property
    def num_hot(self) -> int:
        return self.hot_rows.num if self.hot_rows is not None else 0

    @property
    def hot(self) -> Tensor | None:
        return self.hot_rows.rows if self.hot_rows is not None else None

    @property
    def hot_grad(self) -> Tensor | None:
        return self.hot_rows.grad if self.hot_rows is not None else None

    @property
    def hot_ids(self) -> np.ndarray:
        return self.hot_rows.ids if self.hot_rows is not None else np.zeros(0, dtype=np.int64)

    def refresh_hot(self, shard_like: Tensor, hot_like: Tensor) -> None:
        self.hot_rows.refresh(shard_like, hot_like)

    def write_hot(self, shard_like: Tensor, hot_like: Tensor) -> None:
        self.hot_rows.write(shard_like, hot_like)

    def hot_touched_slots(self) -> Tensor:
        return self.hot_rows.touched_slots()

    # -- provider interface --------------------------------------------------------------------------
    def _start(self, token_ids: "Tensor | np.ndarray") -> RowLookup:
        """Plan on the host and send the counts (the first phase of a lookup); ``token_ids``: the host batch."""
        flat = positions(host_ids(token_ids), self.sequence_shard)
        bad = vocabulary_error(flat, self.vocab_size, where=f" on rank {self.rank}")
        flat = flat if bad is None else flat.clip(0, self.vocab_size - 1)
        split = None
        if self.num_hot:    # only the tail goes through the exchange
            split, flat = self.hot_rows.split(flat, self.dedup, self.shard.device)
        plan = make_plan(flat, self.placement, self.dedup and split is None, self.shard.device)
        lookup = RowLookup(plan, self.placement, self.group, self.rank, self.shard, self.stream, self.stats, bad,
                           id_group=self.id_group)
        lookup.hot = split
        if split is not None:
            split.place_tail(plan.host_position, self.shard.device)
            plan.num_positions = split.num_positions
            self.stats.unique_ids += split.num_hot
            self.stats.hot_hits += split.num_hot
        return lookup

    def prefetch(self, token_ids: Tensor) -> None:
        """Announce a coming micro-batch with its **host** token ids (before their copy to the device): the
        exchange then needs nothing from the device (a batch already on the device, e.g. DALI's, is read back
        here). With overlap on its exchange starts now (counts; the ids and rows now too, or at ``advance``
        when deferred: ``DEFER_ROWS``); with overlap off it runs at the lookup."""
        on_host = isinstance(token_ids, np.ndarray) or token_ids.device.type == "cpu"
        ids = host_ids(token_ids if on_host else token_ids.cpu())
        pending = self._start(ids) if self.overlap else None
        defer = self.DEFER_ROWS if self.DEFER_ROWS is not None else self.stream.active
        if pending is not None and not defer:
            pending.advance()
        self._prefetched.append((ids, pending))

    def advance(self) -> None:
        """After the model enqueued a micro-batch's forward: move the next prefetched exchange on (its ids have
        had that forward's time to arrive), so that its rows travel while the device computes."""
        for _, pending in self._prefetched:
            if pending is not None and pending.state == "ids_sent":
                pending.advance()
                self.deferred_sends += 1
                return

    def lookup(self, token_ids: Tensor) -> TokenRows:
        if self._prefetched:
            ids, pending = self._prefetched.popleft()
            same = tuple(ids.shape) == tuple(token_ids.shape) and (
                token_ids.device.type != "cpu" or np.array_equal(ids, host_ids(token_ids)))   # free on the host only
            if not same:
                raise RuntimeError("token-row exchange: the micro-batch differs from the prefetched one "
                                   "(prefetch and forward must see the same micro-batches in the same order)")
            if pending is None:
                pending = self._start(ids)
        else:   # a caller that did not prefetch: its ids are read back from the device (a sync on GPU)
            pending = self._start(token_ids.cpu())
        self._record_order(pending)
        rows = pending.wait_rows()
        if torch.is_grad_enabled():
            # Row gradients of micro-batches two or more back have had a whole forward and backward to
            # arrive: add them to the shard's gradient now and free their buffers, so at most two
            # micro-batches' gradients are in flight whatever the number of micro-batches per step.
            self._accumulate_arrived(keep=1)
            self._in_backward.append(pending)
            rows = rows_with_grad_exchange(self._anchor, rows, lambda g, p=pending: p.send_grads(g, self.grad_scale))
        split = pending.hot
        if split is not None:   # tail rows, then the replicas' rows, put in unique-id order
            rows = torch.cat([rows, self.hot_rows.lookup(split, self._anchor)]).index_select(0, split.gather)
            return TokenRows(unique_ids=split.unique_ids, unique_rows=rows, inverse=split.inverse)
        return TokenRows(unique_ids=pending.plan.unique_ids, unique_rows=rows, inverse=pending.plan.inverse)

    def _record_order(self, pending: RowLookup) -> None:
        """The overlap by the order of events (ExchangeStats.lookups_ahead / lookups_in_flight): was this
        lookup's exchange started before the previous micro-batch's compute, and were its rows sent before now."""
        asked = next(EVENT_CLOCK)
        previous, self._previous_lookup_at = self._previous_lookup_at, asked
        if previous is not None and pending.started_at < previous:
            self.stats.lookups_ahead += 1
        if pending.rows_sent_at is not None and pending.rows_sent_at < asked:
            self.stats.lookups_in_flight += 1

    # -- gradients and optimizer hooks ---------------------------------------------------------------
    def finish_backward(self) -> None:
        """Wait for every row gradient of the step and add the owned ones to ``shard_grad``, in
        micro-batch order (deterministic)."""
        if self._prefetched:
            raise RuntimeError("token-row exchange: a prefetched micro-batch was never consumed")
        if any(p.state != "grads_sent" for p in self._in_backward):
            raise RuntimeError("token-row exchange: a micro-batch's rows were looked up but their backward never "
                               "ran (every training forward needs its backward before the optimizer step)")
        self._previous_lookup_at = None    # the next lookup is the first of a step
        works = self.hot_rows.start_reduce() if self.num_hot else []
        self._accumulate_arrived(keep=0)    # the tail's row gradients, while the replicas' are summed
        if self.num_hot:
            self.hot_rows.finish_reduce(works)
            self.stats.hot_reduce_bytes += self.hot.numel() * self.hot.element_size()

    def _accumulate_arrived(self, keep: int) -> None:
        """Add the row gradients of all but the ``keep`` latest backward-done micro-batches to ``shard_grad``,
        oldest first: the same order whenever it happens, so the sum is bitwise the same."""
        done = 0
        while done < len(self._in_backward) and self._in_backward[done].state == "grads_sent":
            done += 1
        for _ in range(max(0, done - keep)):
            pending = self._in_backward.popleft()
            pending.accumulate_grads(self.shard_grad)
            self.mark_touched(pending.host_touched_rows, pending.touched_rows)

    def mark_touched(self, rows: "np.ndarray | list[int]", device_rows: Tensor | None = None) -> None:
        """Record shard rows as holding a gradient this step, on the host and on the device
        (``device_rows``: the same indices already on the device)."""
        rows = np.asarray(rows, dtype=np.int64)
        self._touched_host[rows] = True
        self.touched[device_rows if device_rows is not None else torch.from_numpy(rows).to(self.touched.device)] = True
        self._touched_rows = None

    def touched_rows(self) -> Tensor:
        """Indices of the shard rows that received a gradient this step (every other row's is zero), ascending;
        from the host's record (no device read), made once per step."""
        if self._touched_rows is None:
            self._touched_rows = torch.from_numpy(np.flatnonzero(self._touched_host)).to(self.shard.device,
                                                                                         non_blocking=True)
        return self._touched_rows

    # Zeroing, clipping and the norm read only the touched rows when they are at most this share of the shard
    # (a large vocabulary: a micro-batch touches a few thousand of 150k ids); above it, one pass over the whole
    # shard is cheaper than gathering and scattering rows (measured: benchmarks/table_optimizer_bench.py).
    ROW_OPS_MAX_SHARE = 1 / 8

    def _row_ops(self) -> Tensor | None:
        rows = self.touched_rows()
        return rows if rows.numel() <= self.ROW_OPS_MAX_SHARE * self.shard.shape[0] else None

    def zero_grad(self) -> None:
        """Clear the step's gradient (only the touched rows hold any)."""
        rows = self._row_ops()
        if rows is None:
            self.shard_grad.zero_()
        else:
            self.shard_grad.index_fill_(0, rows, 0.0)
        self.touched.zero_()
        self._touched_host[:] = False
        self._touched_rows = None
        if self.num_hot:
            self.hot_rows.zero_grad()

    def scale_grad(self, coeff: float) -> None:
        """Multiply the step's gradient by ``coeff`` (the joint clipping coefficient)."""
        rows = self._row_ops()
        if rows is None:
            self.shard_grad.mul_(coeff)
        else:
            self.shard_grad.index_copy_(0, rows, self.shard_grad.index_select(0, rows).mul_(coeff))
        if self.num_hot:
            self.hot_grad.mul_(coeff)

    def grad_norm_sq(self) -> float:
        """Squared L2 norm of the whole table's gradient (summed over the EmbP group and the stages)."""
        rows = self._row_ops()
        g = self.shard_grad if rows is None else self.shard_grad.index_select(0, rows)
        local = torch.linalg.vector_norm(g, dtype=torch.float32).square().reshape(1)
        if self.num_hot and self.rank == 0:   # the replicas' gradient (the same on every rank) counted once
            local += torch.linalg.vector_norm(self.hot_grad, dtype=torch.float32).square()
        dist.all_reduce(local, group=self.group)
        if self.pipeline_group is not None and dist.get_world_size(self.pipeline_group) > 1:
            dist.all_reduce(local, group=self.pipeline_group)
        return float(local)

    def step(self, lr: float) -> None:
        """The table optimizer's step (``ShardedTableOptimizer``: dense or sparse AdamW over the shard)."""
        if self.optimizer is None:
            raise RuntimeError("sharded token table: no optimizer to step (build a ShardedTableOptimizer over it)")
        self.optimizer.step(lr=lr)

    def pop_stats(self) -> dict[str, float]:
        """The exchange's counters since the previous call (``exchange/*`` metrics)."""
        out = self.stats.as_metrics()
        self.stats = ExchangeStats()
        return out

    def full_table(self) -> Tensor:
        """Gather this stage's table in token order (tests and small models only)."""
        parts = [torch.empty_like(self.shard) for _ in range(self.world)]
        dist.all_gather(parts, self.shard.contiguous(), group=self.group)
        permuted = torch.cat(parts)[: self.vocab_size]
        return permuted[self.placement.position_of]        # token t sits at permuted position position_of[t]

    def local_bytes(self) -> int:
        return self.shard.numel() * self.shard.element_size()

    # -- checkpoints ---------------------------------------------------------------------------------
    def sharded_tensor(self, key: str, local: Tensor):
        """``local`` ([block, ...], rows of this rank's permuted range) as a piece of a global [V, ...]
        tensor in permuted row order: any world size cuts the same global tensor into its own blocks. A
        [block, L, ...] tensor is this stage's layers of the global [V, L_total, ...] one; a per-row tensor
        ([block]: the same on every stage, which all see the same token ids) is a replica on stages > 0."""
        rows = self.stop_row - self.start_row
        data = local[:rows]
        sl = self.layers
        shape, offset, frag = [self.vocab_size, *data.shape[1:]], [self.start_row] + [0] * (local.dim() - 1), \
            [self.world] + [1] * (local.dim() - 1)
        per_layer = local.dim() >= 2 and local.shape[1] == sl.count
        if per_layer:
            shape[1], offset[1], frag[1] = sl.total, sl.offset, sl.num_stages
        return ShardedTensor(
            key=key,
            data=data,
            dtype=data.dtype,
            local_shape=tuple(data.shape),
            global_shape=tuple(shape),
            global_offset=tuple(offset),
            axis_fragmentations=tuple(frag),
            replica_id=0 if per_layer else sl.stage,
            prepend_axis_num=0,
        )

    def state(self, prefix: str = "") -> dict:
        """The shard as this rank's block of the global [V, L_total, n_e, d] table in permuted row order
        (``sharded_tensor``); the optimizer's moments are its own (``ShardedTableOptimizer.sharded_state_dict``)."""
        return {f"{prefix}shard": self.sharded_tensor(f"{prefix}shard", self.shard)}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's GPTModel.sharded_state_dict calls this for its ``token_table`` child: ``state``."""
        return self.state(prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = f"{prefix}shard"
        if key in state_dict:
            value = state_dict[key]
            rows = self.stop_row - self.start_row
            with torch.no_grad():
                self.shard[:rows].copy_(value.to(self.shard.dtype))
            if self.num_hot:
                self.refresh_hot(self.shard, self.hot)
        elif strict:
            missing_keys.append(key)

