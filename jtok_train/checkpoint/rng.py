"""Every rank's RNG states (torch CPU and CUDA, Megatron's CUDA RNG tracker, python, numpy) as tensors: a
checkpoint stores them as ``rng.<name>`` ShardedTensors with one row per rank, so a resume at the same world
size continues every stream exactly."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["rng_tensors", "set_rng", "rng_sharded"]


def rng_tensors() -> dict[str, torch.Tensor]:
    """This rank's RNG states as 1-D tensors (name -> tensor; same names and lengths on every rank)."""
    # lazy: cost (megatron.core, 4-6 s: checkpoint/ is imported before Megatron, to check a checkpoint first)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    out = {"torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state().cpu()
    for name, state in sorted(get_cuda_rng_tracker().get_states().items()):
        out[f"tracker.{name}"] = state.detach().cpu().clone()
    version, internal, gauss = random.getstate()
    out["python"] = torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64)
    out["python_gauss"] = torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    return out


def set_rng(states: dict[str, torch.Tensor]) -> None:
    """Restore this rank's RNG states from ``rng_tensors()``'s dict."""
    # lazy: cost (megatron.core, 4-6 s: checkpoint/ is imported before Megatron, to check a checkpoint first)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(states["torch_cpu"].to(torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].to(torch.uint8))
    tracker = {k[len("tracker."):]: v.to(torch.uint8) for k, v in states.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
    py = states["python"].tolist()
    gauss = float(states["python_gauss"][0]) if py[-1] == 1 else None
    random.setstate((py[0], tuple(py[1:-1]), gauss))
    npy = states["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(npy[:-2], dtype=np.uint32), npy[-2], npy[-1],
                         float(states["numpy_gauss"][0])))


def rng_sharded(rank: int, world: int, local: dict[str, torch.Tensor]) -> dict:
    """``local`` as ShardedTensors ``rng.<name>``: row ``rank`` of a [world, ...] tensor."""
    # lazy: cost (megatron.core, 4-6 s: checkpoint/ is imported before Megatron, to check a checkpoint first)
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {
        name: ShardedTensor.from_rank_offsets(f"rng.{name}", t.unsqueeze(0), (0, rank, world), replica_id=0)
        for name, t in local.items()
    }
