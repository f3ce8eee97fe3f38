"""Run a function on N real processes joined by torch.distributed (gloo on CPU), for tests.

    from jtok_train.testing import run_distributed

    def _check_allreduce(scale):          # module level: the child processes import it by name
        import torch, torch.distributed as dist
        t = torch.ones(1) * scale
        dist.all_reduce(t)
        return t.item()

    def test_allreduce():
        assert run_distributed(_check_allreduce, 2, 3.0) == [6.0, 6.0]

Each rank runs in a fresh process with the caller's environment plus torchrun's (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK), the CPU compatibility layer installed, and torch.distributed initialised. An exception
on any rank fails the call with that rank's traceback; a hang fails it after `timeout` seconds. Megatron's
parallel_state and the process group are torn down when func returns.

Start-up: the ranks are forked from a server process that has imported torch, megatron.core and jtok_train's
training stack once (multiprocessing's "forkserver" with ``PRELOAD``): a rank starts in a fraction of a second
instead of paying the imports (7.5 s) again. Every rank is still a new process, forked from a server that never
ran a test, so nothing one call leaves behind (process groups, Megatron's parallel state, environment variables,
RNG seeds, threads) reaches the next. The server's environment is the one it started with; a call whose
environment differs from it in a variable read at import time (``IMPORT_TIME_ENV``: Triton's interpreter, the
kernel backend) starts its ranks with "spawn" instead. ``JTOK_TEST_START=spawn`` forces spawn everywhere.
``JTOK_TEST_TIMING=<file>``: each call appends one JSON line (start-up, func and total seconds) for the
suite's timing report (jtok_train/testing/timing.py).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import time
import traceback
import zlib
from typing import Any, Callable

__all__ = ["DistributedTestError", "run_distributed", "fill_params_by_global_position", "free_port", "PRELOAD"]

# What the fork server imports once: everything a rank of the tests imports to train, evaluate, save and load
# (measured: importing these is the 7.5 s a spawned rank paid before its first line of work).
PRELOAD = [
    "torch", "torch.distributed", "torch.distributed.checkpoint", "numpy",
    "megatron.core", "megatron.core.parallel_state", "megatron.core.models.gpt", "megatron.core.optimizer",
    "megatron.core.distributed", "megatron.core.dist_checkpointing", "megatron.core.pipeline_parallel",
    "megatron.core.transformer.moe.moe_layer",
    "jtok_train.compat", "jtok_train.compat.megatron", "jtok_train.config", "jtok_train.training.trainer",
    "jtok_train.training.train_module", "jtok_train.model.builder", "jtok_train.tables.sharded",
    "jtok_train.checkpoint", "jtok_train.data.datasets", "jtok_train.data.tokenizer",
]
# Environment variables a preloaded module reads when it is imported (so the server's value would win).
IMPORT_TIME_ENV = ("TRITON_INTERPRET", "JTOK_KERNELS", "CUDA_VISIBLE_DEVICES")
_server_env: dict[str, str] | None = None     # the environment the fork server started with


def _context(force_spawn: bool = False, env: dict[str, str] | None = None):
    """multiprocessing's forkserver context with PRELOAD (started on first use, with this process's
    environment), or spawn where ``env`` (the child's environment; this process's by default) differs from the
    server's in a variable read at import time."""
    global _server_env
    if force_spawn or os.environ.get("JTOK_TEST_START", "forkserver") == "spawn":
        return mp.get_context("spawn")
    here = {k: os.environ.get(k) for k in IMPORT_TIME_ENV}
    want = here if env is None else {k: env.get(k) for k in IMPORT_TIME_ENV}
    if _server_env is None:
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
        _server_env = here
    return mp.get_context("forkserver") if want == _server_env else mp.get_context("spawn")


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
    ctx = _context(env={**os.environ, **(env or {})})
    t_start = time.time()
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
            "JTOK_TEST_RANK": "1",     # the suite's timing counts this rank's start-up here, not in its Trainer
            **(env or {}),
        }
        p = ctx.Process(
            target=_rank_main,
            args=(func, args, kwargs, {**os.environ, **rank_env}, backend, threads_per_rank, results),
            name=f"run_distributed-rank{rank}",
            daemon=True,
        )
        p.start()
        procs.append(p)

    out: dict[int, Any] = {}
    phases: dict[int, tuple[float, float]] = {}
    try:
        _collect(func, procs, results, timeout, out, phases)
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    _record_timing(func, world_size, ctx.get_start_method(), t_start, phases)
    return [out[r] for r in range(world_size)]


def _collect(func: Callable[..., Any], procs: list, results: Any, timeout: float, out: dict[int, Any],
             phases: dict[int, tuple[float, float]]) -> None:
    """Every rank's result and phase times from ``results`` into ``out`` and ``phases``, or a
    DistributedTestError naming the ranks that did not finish in ``timeout`` s, died without a result (a dead
    peer before the rank its death broke), or raised (with the rank's traceback)."""
    name = getattr(func, "__name__", func)
    world_size = len(procs)
    deadline = time.monotonic() + timeout
    while len(out) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(out))
            raise DistributedTestError(f"{name}: ranks {missing} did not finish within {timeout:.0f} s")
        try:
            rank, status, value, phase = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
            if not dead:
                continue
            # give a dying rank's queued traceback a moment to arrive before blaming the exit code
            try:
                rank, status, value, phase = results.get(timeout=2.0)
            except queue.Empty:
                codes = {r: procs[r].exitcode for r in dead}
                raise DistributedTestError(f"{name}: rank(s) died without a result, exit codes {codes}") from None
        if status == "error":
            # a peer that died makes the others fail in their next collective: name the dead rank first
            for _ in range(20):
                dead = {r: p.exitcode for r, p in enumerate(procs)
                        if r != rank and r not in out and p.exitcode not in (None, 0)}
                if dead or all(p.exitcode is not None for r, p in enumerate(procs) if r != rank):
                    break
                time.sleep(0.05)
            if dead:
                raise DistributedTestError(f"{name}: rank(s) died without a result, exit codes {dead}; "
                                           f"rank {rank} then failed:\n{value}")
            raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{value}")
        out[rank] = value
        phases[rank] = phase


def _record_timing(func: Callable[..., Any], world_size: int, method: str, t_start: float,
                   phases: dict[int, tuple[float, float]]) -> None:
    """One JSON line in $JTOK_TEST_TIMING: start-up (the last rank ready to run func), func (until the last rank
    finished it) and the whole call, in seconds."""
    path = os.environ.get("JTOK_TEST_TIMING")
    if not path or len(phases) < world_size:
        return
    ready = max(p[0] for p in phases.values())
    done = max(p[1] for p in phases.values())
    rec = {"kind": "run_distributed", "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0],
           "func": getattr(func, "__name__", str(func)), "world": world_size, "start": method,
           "startup_s": round(ready - t_start, 3), "func_s": round(done - ready, 3),
           "total_s": round(time.time() - t_start, 3)}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _rank_main(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rank_env: dict[str, str],
    backend: str | None,
    threads: int,
    results: "mp.Queue[tuple[int, str, Any]]",
) -> None:
    os.environ.clear()         # the caller's environment, not the fork server's
    os.environ.update(rank_env)
    rank = int(rank_env["RANK"])
    t_ready = t_done = time.time()
    try:
        # imported inside the try, in the rank: a failing import goes back to the parent as the test's error
        # lazy: child process (the rank's imports, inside the try)
        import torch
        import torch.distributed as dist  # lazy: child process (as above)

        from jtok_train.compat import destroy_model_parallel, init_distributed  # lazy: child process (as above)

        import numpy as np  # lazy: child process (as above)

        # a forked rank would otherwise start from the fork server's RNG states, the same in every rank: draw
        # fresh default seeds, as a newly started process does (Python's random reseeds itself at fork)
        torch.seed()
        np.random.seed()
        torch.set_num_threads(threads)
        world_size = int(rank_env["WORLD_SIZE"])
        if backend is None:
            use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
            backend = "nccl" if use_nccl else "gloo"
        init_distributed(backend)
        t_ready = time.time()
        try:
            value = func(*args, **kwargs)
        finally:
            t_done = time.time()
            destroy_model_parallel()
        # every rank returns before any tears down the group (a peer may still be in a collective)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, "ok", value, (t_ready, t_done)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as a test failure
        results.put((rank, "error", traceback.format_exc(), (t_ready, t_done)))


def fill_params_by_global_position(model: Any, seed: int = 0, std: float = 0.02, skip: tuple[str, ...] = ()) -> None:
    """Overwrite every parameter of a Megatron model with values that depend only on the parameter's
    checkpoint key and global position, not on how it is sharded (TP, EP, PP) or on the world size.

    Two runs with different parallel layouts then start from the same global weights, so their losses can be
    compared. Uses the model's sharded_state_dict (global shapes and offsets, as dist_checkpointing does).
    Norm weights keep a mean of 1. Keys containing any of ``skip`` keep their values (e.g. "token_table": the
    replicated and the sharded tables are initialised per token id already, identically).
    """
    # lazy: cost (torch + megatron.core, 5-8 s: the test process imports this module without them)
    import torch
    # lazy: cost (as above; it runs in a rank, where they are preloaded)
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values  # lazy: cost (as above)

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
    from jtok_train.compat.cpu import free_port as _port  # lazy: cost (torch, 2-5 s: the test process goes without it)

    return _port()
