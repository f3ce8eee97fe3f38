"""Hot rows of a sharded table (``parallel.hot_rows``): the rows of the most frequent token ids, replicated on
every rank of the embedding-parallel group.

Token frequencies are Zipfian, so the rows of a few thousand ids are most of every micro-batch's requests
(DESIGN.md; FlexShard, arXiv:2301.02959, replicates recommendation-table rows by access frequency the same way).
A lookup serves its hot ids from the replicas (slot order = ascending id) and exchanges only the other ids (the
tail). The replicas' gradient is summed over the group by an asynchronous, bucketed all-reduce, started when the
backward has ended and waited on after the tail's row gradients arrived; every rank applies the same optimizer
update to the same values, so the replicas stay bitwise equal. The owner of a hot id keeps its shard row (and its
optimizer moments) equal to the replica, rewritten after every optimizer step (``write``), so checkpoints and
``full_table`` are those of the table without hot rows: a checkpoint resumes with any H and any world size.
Cost per rank: H rows, their gradient and their two moments (the owners' shard slots of hot ids stay allocated:
H / W duplicate rows per rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["HotRows", "HotSplit"]


@dataclass
class HotSplit:
    """A lookup's ids split into hot ones (served from the replicas) and the tail (exchanged)."""

    num_positions: int
    num_hot: int
    host_slots: np.ndarray   # [n_hot] replica slots of the hot unique ids
    slots: Tensor            # the same on the device
    unique_ids: Tensor       # [U] the lookup's unique ids (every position's id without dedup), device
    inverse: Tensor          # [T] position -> index into unique_ids
    host_gather: np.ndarray  # [U] index into cat(tail rows in the tail's id order, hot rows) of each unique id
    gather: "Tensor | None" = None   # the same into cat(tail rows as they arrive, hot rows), device: place_tail

    def place_tail(self, tail_position: np.ndarray, device) -> None:
        """The tail's rows arrive in the exchange's order: tail row i at ``tail_position[i]`` (its plan's)."""
        g = self.host_gather.copy()
        tail = g < tail_position.size
        g[tail] = tail_position[g[tail]]
        self.gather = torch.from_numpy(g).to(device, non_blocking=True)


class _ReplicaRows(torch.autograd.Function):
    """The replicas' rows of a lookup; the backward adds their gradient to the replicas' (``sink``)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, hot: Tensor, slots: Tensor, sink) -> Tensor:
        ctx.sink = sink
        return hot.index_select(0, slots)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.sink(grad)
        return None, None, None, None


class HotRows:
    BUCKET_BYTES = 32 << 20   # the replicas' gradient is all-reduced in buckets of at most this size

    def __init__(self, ids: np.ndarray, vocab_size: int, position_of: np.ndarray, owned: tuple[int, int],
                 shard: Tensor, group: Any, id_group: Any, grad_scale: float):
        """ids: the hot token ids (unique, ascending); position_of: token -> permuted row position (the
        placement); owned: this rank's [start, stop) of those positions; shard: the table's shard, whose
        owners' rows fill the replicas (collective)."""
        if ids.size and (ids[0] < 0 or ids[-1] >= vocab_size):
            raise ValueError(f"hot row id {ids[0] if ids[0] < 0 else ids[-1]} is outside the vocabulary "
                             f"[0, {vocab_size}): check parallel.hot_rows_file")
        self.ids, self.num = ids, int(ids.size)
        self.group, self.id_group, self.grad_scale = group, id_group, grad_scale
        self.slot = np.full(vocab_size, -1, dtype=np.int64)
        self.slot[ids] = np.arange(self.num)
        self.rows = torch.zeros((self.num, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
        self.grad = torch.zeros_like(self.rows)
        self._touched_host = np.zeros(self.num, dtype=bool)    # this rank's lookups, this step
        self._touched: Tensor | None = None                    # the group's, after finish_reduce
        pos = position_of[ids]
        mine = (pos >= owned[0]) & (pos < owned[1])
        self._owned_slots = torch.from_numpy(np.flatnonzero(mine)).to(shard.device)
        self._owned_rows = torch.from_numpy(pos[mine] - owned[0]).to(shard.device)
        self.refresh(shard, self.rows)

    @torch.no_grad()
    def refresh(self, shard_like: Tensor, hot_like: Tensor) -> None:
        """Fill the replicas ``hot_like`` [H, ...] from the owners' rows of ``shard_like`` [block, ...] (the
        table, a moment, the per-row steps): each owner puts its hot rows in, the group sums (collective)."""
        hot_like.zero_()
        hot_like.index_copy_(0, self._owned_slots, shard_like.index_select(0, self._owned_rows))
        dist.all_reduce(hot_like, group=self.group)

    @torch.no_grad()
    def write(self, shard_like: Tensor, hot_like: Tensor) -> None:
        """The owners' shard rows of the hot ids := the replicas (after every optimizer step)."""
        shard_like.index_copy_(0, self._owned_rows, hot_like.index_select(0, self._owned_slots))

    def split(self, flat: np.ndarray, dedup: bool, device) -> tuple[HotSplit, np.ndarray]:
        """(the split of a lookup's host ids, the tail's ids in unique-id order: what the exchange plans for,
        without a dedup of its own)."""
        if dedup:
            uniq, inverse = np.unique(flat, return_inverse=True)
        else:
            uniq, inverse = flat, np.arange(flat.size)
        slot = self.slot[uniq]
        is_hot = slot >= 0
        tail, hot = np.flatnonzero(~is_hot), np.flatnonzero(is_hot)
        gather = np.empty(uniq.size, dtype=np.int64)
        gather[tail] = np.arange(tail.size)
        gather[hot] = tail.size + np.arange(hot.size)

        def dev(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=True)

        host_slots = slot[hot]
        return HotSplit(int(flat.size), int(hot.size), host_slots, dev(host_slots), dev(uniq),
                        dev(inverse.reshape(-1)), gather), uniq[tail]

    def lookup(self, split: HotSplit, anchor: Tensor) -> Tensor:
        """The replicas' rows of a lookup's hot ids (autograd-connected to ``grad`` through ``anchor``)."""
        if not torch.is_grad_enabled():
            return self.rows.index_select(0, split.slots)
        self._touched_host[split.host_slots] = True
        self._touched = None
        return _ReplicaRows.apply(anchor, self.rows, split.slots,
                                  lambda g: self.grad.index_add_(0, split.slots, g.to(self.grad.dtype),
                                                                 alpha=self.grad_scale))

    def start_reduce(self) -> list:
        """Start the all-reduce of the replicas' gradient (buckets) and of the touched flags (host group)."""
        g = self.grad
        step = max(1, self.BUCKET_BYTES // max(1, g[0].numel() * g.element_size()))
        works = [dist.all_reduce(g[i : i + step], group=self.group, async_op=True) for i in range(0, len(g), step)]
        self._flags = torch.from_numpy(self._touched_host.astype(np.int32))
        works.append(dist.all_reduce(self._flags, group=self.id_group, async_op=True))
        return works

    def finish_reduce(self, works: list) -> None:
        for w in works:
            w.wait()
        self._touched = torch.from_numpy(np.flatnonzero(self._flags.numpy())).to(self.rows.device)

    def touched_slots(self) -> Tensor:
        """Slots of the replicas any rank of the group looked up this step (after ``finish_reduce``)."""
        if self._touched is None:
            raise RuntimeError("hot rows: the step's touched replicas are known after finish_backward")
        return self._touched

    def zero_grad(self) -> None:
        self.grad.zero_()
        self._touched_host[:] = False
        self._touched = None
