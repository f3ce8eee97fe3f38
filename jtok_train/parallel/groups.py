"""Process groups of the embedding-parallel exchange."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["embedding_parallel_group"]

_GROUP = None


def embedding_parallel_group():
    """All ranks of the (single) pipeline stage, as a group of its own: the exchange's asynchronous
    collectives then never interleave with Megatron's gradient all-reduces on the same communicator."""
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(list(range(dist.get_world_size())))
    return _GROUP


def reset() -> None:
    global _GROUP
    _GROUP = None
