"""Run a function on N real processes joined by torch.distributed (gloo on CPU), for tests.

    from jtok_train.testing import run_distributed

    def _check_allreduce(scale):          # module level: the child processes import it by name
        import torch, torch.distributed as dist
        t = torch.ones(1) * scale
        dist.all_reduce(t)
        return t.item()

    def test_allreduce():
        assert run_distributed(_check_allreduce, 2, 3.0) == [6.0, 6.0]

Each rank runs in a fresh "spawn" process with the torchrun environment (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK), the CPU compatibility layer installed, and torch.distributed initialised. An exception
on any rank fails the call with that rank's traceback; a hang fails it after `timeout` seconds. Megatron's
parallel_state and the process group are torn down when func returns.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable

__all__ = ["DistributedTestError", "run_distributed", "fill_params_by_global_position", "free_port"]


class DistributedTestError(AssertionError):
    """A rank of run_distributed raised (message carries its traceback), hung, or died."""


def run_distributed(
    func: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    backend: str | None = None,
    threads_per_rank: int | None = None,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run func(*args, **kwargs) on `world_size` processes; return the per-rank results, by rank.

    func, args, kwargs and the results must be picklable (func: a module-level function). backend: None picks
    nccl on a CUDA machine with enough GPUs, else gloo. threads_per_rank defaults to 1 when world_size > 1
    (ranks share a few cores; more threads only contend). env: extra environment variables for the ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if getattr(func, "__qualname__", "").count("<locals>") or getattr(func, "__name__", "") == "<lambda>":
        raise ValueError(f"run_distributed needs a module-level function, got {func!r}")
    if threads_per_rank is None:
        threads_per_rank = 1 if world_size > 1 else max(1, os.cpu_count() or 1)
    port = free_port()
    ctx = mp.get_context("spawn")
    results: "mp.Queue[tuple[int, str, Any]]" = ctx.Queue()
    procs = []
    for rank in range(world_size):
        rank_env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": str(threads_per_rank),
            **(env or {}),
        }
        p = ctx.Process(
            target=_rank_main,
            args=(func, args, kwargs, rank_env, backend, threads_per_rank, results),
            name=f"run_distributed-rank{rank}",
            daemon=True,
        )
        p.start()
        procs.append(p)

    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise DistributedTestError(
                    f"{getattr(func, '__name__', func)}: ranks {missing} did not finish within {timeout:.0f} s"
                )
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    # give a dying rank's queued traceback a moment to arrive before blaming the exit code
                    try:
                        rank, status, value = results.get(timeout=2.0)
                    except queue.Empty:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise DistributedTestError(
                            f"{getattr(func, '__name__', func)}: rank(s) died without a result, exit codes {codes}"
                        ) from None
                else:
                    continue
            if status == "error":
                raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [out[r] for r in range(world_size)]


def _rank_main(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rank_env: dict[str, str],
    backend: str | None,
    threads: int,
    results: "mp.Queue[tuple[int, str, Any]]",
) -> None:
    os.environ.update(rank_env)
    rank = int(rank_env["RANK"])
    try:
        import torch
        import torch.distributed as dist

        from jtok_train.compat import destroy_model_parallel, init_distributed

        torch.set_num_threads(threads)
        world_size = int(rank_env["WORLD_SIZE"])
        if backend is None:
            use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
            backend = "nccl" if use_nccl else "gloo"
        init_distributed(backend)
        try:
            value = func(*args, **kwargs)
        finally:
            destroy_model_parallel()
        # every rank returns before any tears down the group (a peer may still be in a collective)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as a test failure
        results.put((rank, "error", traceback.format_exc()))


def fill_params_by_global_position(model: Any, seed: int = 0, std: float = 0.02, skip: tuple[str, ...] = ()) -> None:
    """Overwrite every parameter of a Megatron model with values that depend only on the parameter's
    checkpoint key and global position, not on how it is sharded (TP, EP, PP) or on the world size.

    Two runs with different parallel layouts then start from the same global weights, so their losses can be
    compared. Uses the model's sharded_state_dict (global shapes and offsets, as dist_checkpointing does).
    Norm weights keep a mean of 1. Keys containing any of ``skip`` keep their values (e.g. "token_table": the
    replicated and the sharded tables are initialised per token id already, identically).
    """
    import zlib

    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    chunks = model if isinstance(model, (list, tuple)) else [model]
    with torch.no_grad():
        for chunk in chunks:
            module = chunk.module if hasattr(chunk, "module") else chunk
            sharded = module.sharded_state_dict()
            # factories (a GLU's fc1 is stored as its two halves, views of the weight) become ShardedTensors:
            # without this the fc1 weights keep their layout-dependent random init
            apply_factories(sharded)
            for sh in nested_values(sharded):
                if not isinstance(sh, ShardedTensor) or not torch.is_floating_point(sh.data):
                    continue
                if any(part in sh.key for part in skip):
                    continue
                if getattr(sh, "flattened_range", None) is not None:
                    raise NotImplementedError(f"{sh.key}: flattened (distributed-optimizer) shards")
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(sh.key.encode()))
                full = torch.randn(sh.global_shape, generator=gen, dtype=torch.float32) * std
                if sh.key.endswith(("norm.weight", "layernorm.weight", "layer_norm_weight")):
                    full += 1.0
                pre = sh.prepend_axis_num
                index = tuple(sh.global_offset[:pre]) + tuple(
                    slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.local_shape)
                )
                sh.data.copy_(full[index].reshape(sh.data.shape).to(sh.data.dtype))


def free_port() -> int:
    """A free TCP port on this host (for a test's rendezvous)."""
    from jtok_train.compat.cpu import free_port as _port

    return _port()
