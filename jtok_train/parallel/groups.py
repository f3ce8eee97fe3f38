"""Process groups of the embedding-parallel exchange."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

__all__ = ["embedding_parallel_group", "embedding_parallel_host_group"]

_GROUP = None
_HOST_GROUP = None
_KEY = None


def embedding_parallel_group():
    """The ranks of this rank's pipeline stage (all ranks without pipeline parallelism), as a group of its
    own: the exchange's asynchronous collectives then never interleave with Megatron's gradient all-reduces
    on the same communicator. Every stage serves the tables of its own layers to its own ranks. Collective:
    every rank creates every stage's group (torch's rule for new_group); made again for another stage layout
    in the same process."""
    global _GROUP, _HOST_GROUP, _KEY
    stage = ps.get_pipeline_model_parallel_rank()
    stages: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(stages, stage)
    key = tuple(stages)
    if _GROUP is None or _KEY != key:
        host_too = dist.get_backend() != "gloo"
        for s in sorted(set(stages)):
            ranks = [r for r, st in enumerate(stages) if st == s]
            group = dist.new_group(ranks)
            # the exchange's counts and ids travel between hosts (no device sync): a gloo twin of the group
            host = dist.new_group(ranks, backend="gloo") if host_too else group
            if s == stage:
                _GROUP, _HOST_GROUP = group, host
        _KEY = key
    return _GROUP


def embedding_parallel_host_group():
    """The same ranks as ``embedding_parallel_group()`` on gloo (the group itself on a gloo run), for the
    exchange's host-side counts and ids."""
    embedding_parallel_group()
    return _HOST_GROUP


def reset() -> None:
    global _GROUP, _HOST_GROUP, _KEY
    _GROUP, _HOST_GROUP, _KEY = None, None, None
