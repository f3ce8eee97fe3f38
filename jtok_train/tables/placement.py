"""Row placement of the sharded token tables.

Token ids are visited in the order of a fixed seeded permutation (the same one that defines the
tables' initial values, ``jtok_train.tables.init.row_permutation``) and cut into contiguous
blocks, one per rank of the embedding-parallel group. The permutation spreads the Zipfian head of the
vocabulary over all ranks (contiguous id ranges put most traffic on rank 0: DESIGN.md measured a
max/mean load of 3.4-17.5 without it, 1.2-1.9 with it), and a table stored in permuted order reshards
to any world size by re-cutting the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from jtok_train.tables.init import row_permutation

__all__ = ["RowPlacement"]


@dataclass
class RowPlacement:
    vocab_size: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        perm = row_permutation(self.vocab_size, self.seed)          # permuted position -> token
        self.position_of = torch.empty_like(perm)
        self.position_of[perm] = torch.arange(self.vocab_size)      # token -> permuted position
        self.block = -(-self.vocab_size // self.world_size)         # rows per rank (last one padded)
        self.position_of_host = self.position_of.numpy()            # the same, for host-side (numpy) plans

    def owned_range(self, rank: int) -> tuple[int, int]:
        """Permuted positions [start, stop) held by ``rank`` (stop - start <= block)."""
        start = min(rank * self.block, self.vocab_size)
        return start, min(start + self.block, self.vocab_size)

    def owner(self, token_ids: Tensor) -> Tensor:
        return torch.div(self.position_of[token_ids], self.block, rounding_mode="floor")

    def local_row(self, token_ids: Tensor) -> Tensor:
        return self.position_of[token_ids] % self.block

    def owner_host(self, token_ids: "np.ndarray") -> "np.ndarray":
        """``owner`` on host ids (numpy): the exchange plans on the host, before the batch reaches the device."""
        return self.position_of_host[token_ids] // self.block

    def local_row_host(self, token_ids: "np.ndarray") -> "np.ndarray":
        return self.position_of_host[token_ids] % self.block
