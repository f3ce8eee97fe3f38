"""JTok tables in host memory for inference: only the rows of the current tokens reach the compute device.

``HostTokenTable`` is a token-row provider (``jtok_train.tables.rows.TokenRowProvider``) whose table,
``[V, L, n_e, d]`` in token order, stays in host memory (pinned on CUDA, so copies can be asynchronous).
Per forward it takes the unique ids of the current tokens (the prompt's unique ids at prefill, the new
token at each decode step), gathers their rows of every layer on the host into a staging buffer, and copies
that one block to the device:

* CUDA: the gather runs on the host into a pinned staging buffer, the copy is ``non_blocking`` on a copy
  stream and records an event; ``lookup`` makes the compute stream wait on the event (a device-side wait,
  the host does not block; ``record_stream`` so the allocator keeps the rows alive). Ids are known before
  the forward, so ``prefetch(ids)`` issues the copy before the forward is launched. What it overlaps today
  is little: the host gather needs the sampled id on the host (one small device->host sync per step), and
  the model looks the rows up when its forward starts, so the compute stream waits there. The copy itself
  is small (e.g. 560 KiB per token for the 17B config, tens of microseconds over PCIe); hiding it behind
  the first layers would need an event per layer in ``TokenRows`` (each layer waiting for its own slice).
* CPU: the same steps, synchronously (the "device" is the CPU, the copy a memcpy into a separate buffer,
  so the cost of the transfer is paid as it would be).

What crosses per token: all ``L * n_e`` candidate rows, ``L * n_e * d * bytes`` (e.g. JTok-M n_e = 5,
d = 2048, 28 layers, bf16: 573 KiB; JTok: ``L * d * bytes``). The paper's host-memory inference moves
``O(K * d)`` per token per layer: it blends the K rows the router picked before the copy. That needs the
router's choice, which depends on the layer input, i.e. a device -> host -> device round trip inside every
layer; sending all n_e candidates (n_e / K = 2.5x the bytes at the paper's rho = 0.4) in one transfer per
step keeps the copy off the critical path, as it can be issued before the forward starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import Tensor

from jtok_train.tables.rows import TokenRows, check_token_ids, dedup, positions

__all__ = ["HostTokenTable", "TransferStats", "bytes_per_token"]


def bytes_per_token(num_layers: int, num_sets: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of table rows that cross to the device per new (unique) token: L * n_e * d * element size."""
    return num_layers * num_sets * hidden_size * torch.empty((), dtype=dtype).element_size()


@dataclass
class TransferStats:
    """What the provider moved to the device since the last ``reset``."""

    lookups: int = 0          # forwards served
    positions: int = 0        # token positions those forwards covered
    unique_ids: int = 0       # rows-of-every-layer blocks copied (one per unique id per forward)
    bytes_to_device: int = 0  # bytes copied host -> device

    def as_dict(self) -> dict[str, float]:
        return {"lookups": self.lookups, "positions": self.positions, "unique_ids": self.unique_ids,
                "bytes_to_device": self.bytes_to_device,
                "bytes_per_position": self.bytes_to_device / self.positions if self.positions else 0.0}


class HostTokenTable:
    """Token-row provider over a host-resident table (inference only: rows carry no gradient).

    table: ``[V, L, n_e, d]`` in token order (a copy is kept; pinned when the device is CUDA).
    device: where the model computes. Not an ``nn.Module`` on purpose: ``model.to(device)`` must not move it.
    Its training hooks (``finish_backward`` ... ``step``) are no-ops: inference computes no gradient.
    """

    has_own_optimizer = False   # inference only: nothing is stepped

    def __init__(self, table: Tensor, device: torch.device | str = "cpu"):
        if table.dim() != 4:
            raise ValueError(f"host table must be [V, L, n_e, d], got shape {tuple(table.shape)}")
        self.device = torch.device(device)
        self.vocab_size, self.num_layers, self.num_sets, self.hidden_size = (int(s) for s in table.shape)
        self.cuda = self.device.type == "cuda"
        host = table.detach().to("cpu").contiguous()
        self.table = host.pin_memory() if self.cuda else host.clone()
        self.row_bytes = bytes_per_token(self.num_layers, self.num_sets, self.hidden_size, self.table.dtype)
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.stats = TransferStats()
        self._pending: tuple[Tensor, Tensor, Tensor, Tensor, object] | None = None

    # -- the transfer ----------------------------------------------------------------------------------
    def _start(self, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, object]:
        """Gather the unique ids' rows on the host and start their copy to the device."""
        ids_host = token_ids.detach().to("cpu")
        check_token_ids(ids_host, self.vocab_size)
        flat = positions(ids_host)
        unique_ids, inverse = dedup(flat)
        staging = torch.empty((unique_ids.numel(), *self.table.shape[1:]), dtype=self.table.dtype,
                              pin_memory=self.cuda)
        torch.index_select(self.table, 0, unique_ids, out=staging)
        event = None
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                rows = staging.to(self.device, non_blocking=True)
                uid = unique_ids.to(self.device, non_blocking=True)
                inv = inverse.pin_memory().to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            rows = torch.empty_like(staging, device=self.device)
            rows.copy_(staging)
            uid, inv = unique_ids.to(self.device), inverse.to(self.device)
        self.stats.lookups += 1
        self.stats.positions += flat.numel()
        self.stats.unique_ids += unique_ids.numel()
        self.stats.bytes_to_device += unique_ids.numel() * self.row_bytes
        # the staging buffer must outlive the asynchronous copy: keep it with the pending transfer
        return ids_host, uid, rows, inv, (event, staging)

    def prefetch(self, token_ids: Tensor) -> None:
        """Start the copy for the next forward (its ids are known before it runs)."""
        self._pending = self._start(token_ids)

    def lookup(self, token_ids: Tensor) -> TokenRows:
        pending, self._pending = self._pending, None
        if pending is not None:
            ids_host = token_ids.detach().to("cpu")
            if ids_host.shape != pending[0].shape or not torch.equal(ids_host, pending[0]):
                raise RuntimeError("host token table: the forward's token ids differ from the prefetched ones "
                                   "(prefetch the ids of the very next forward)")
        else:
            pending = self._start(token_ids)
        _, uid, rows, inv, (event, _staging) = pending
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in (uid, rows, inv):
                t.record_stream(current)
        return TokenRows(unique_ids=uid, unique_rows=rows, inverse=inv)

    def advance(self) -> None:
        """No-op: a prefetched copy is issued at ``prefetch`` and waited on at ``lookup``."""

    def reset_stats(self) -> None:
        self.stats = TransferStats()

    def pop_stats(self) -> dict[str, float]:
        """The transfer since the previous call (``TransferStats.as_dict``), and a fresh count."""
        out = self.stats.as_dict()
        self.reset_stats()
        return out

    def state(self, prefix: str = "") -> dict:
        """The whole table in token order as the replicated table's ``weight`` at one rank (the layout of the
        model's ``token_table.weight``; inference does not save, so nothing calls it today)."""
        return {f"{prefix}weight": ShardedTensor.from_rank_offsets(f"{prefix}weight", self.table)}

    # -- training hooks: inference only, the rows carry no gradient ------------------------------------
    def finish_backward(self) -> None:
        """No-op: no backward runs through host rows."""

    def zero_grad(self) -> None:
        """No-op: there is no gradient."""

    def grad_norm_sq(self) -> float:
        """0.0: there is no gradient."""
        return 0.0

    def scale_grad(self, coeff: float) -> None:
        """No-op: there is no gradient."""

    def step(self, lr: float) -> None:
        """No-op: the host table is not trained."""

    def host_bytes(self) -> int:
        return self.table.numel() * self.table.element_size()
