"""Run Megatron-Core (as a library, not a fork) on CPU + gloo.

Megatron-Core assumes CUDA in a few dozen places: `torch.cuda.*` calls, the CUDA RNG state, hard-coded
`device="cuda"` tensors, CUDA type names, the MoE dispatcher's device-to-host copies. On a machine without a
GPU, `install_cpu_compat()` bridges exactly those, so the rest of jtok_train runs the same code paths on a
laptop as on a cluster. Every patch lives here (nothing else in the project may special-case CPU), is small,
says why in one line, and is guarded so that a megatron-core version without the patched symbol is left alone.
Checked on megatron-core 0.16.1 and 0.19.2 (guards with hasattr / try). See README.md; version-dependent
Megatron names outside the CPU bridge live in jtok_train/compat/megatron.py.

On a machine with CUDA `install_cpu_compat()` does nothing.

Longer than 400 lines: one small, independent patch per CUDA-only call of Megatron/torch that the CPU twin
replaces; they stay together as the one list of what the twin changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import logging
import os
import socket
import sys
import time
import types
from typing import Any, Callable

import torch
import torch.distributed as dist

from jtok_train.compat.megatron import apply_megatron_fixes

__all__ = [
    "device",
    "init_distributed",
    "init_model_parallel",
    "install_cpu_compat",
    "is_cpu_compat_installed",
    "destroy_model_parallel",
]

logger = logging.getLogger(__name__)

_INSTALLED = False
_CPU = torch.device("cpu")

# megatron.core modules imported (and their `torch` global proxied) at install time. Missing ones (another
# megatron-core version) are skipped. Lazily imported modules outside this list are proxied when they are
# already loaded at install time; call install_cpu_compat() again after importing more to cover them.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing",
)


# ----------------------------------------------------------------------------------------------- public API


def device() -> torch.device:
    """The device this process computes on: the current CUDA device if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU


def is_cpu_compat_installed() -> bool:
    """True once install_cpu_compat() has patched this process (always False on a CUDA machine)."""
    return _INSTALLED


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed from the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    backend defaults to nccl on a CUDA machine and gloo on CPU. A missing WORLD_SIZE means a single process
    (rank 0 of 1 on 127.0.0.1 with a free port), so the same entry point works without torchrun. Idempotent.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        install_cpu_compat(import_megatron=False)
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_model_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    seed: int = 1234,
    **kwargs: Any,
) -> None:
    """Create Megatron's process groups and seed its RNG tracker.

    tp/pp/ep: tensor, pipeline and expert model-parallel sizes. etp (expert tensor parallel): None takes the
    config's rule (``jtok_train.config.schema.expert_tensor_parallel_size``). Extra kwargs go to parallel_state.initialize_model_parallel. Requires
    torch.distributed to be initialised (see init_distributed).
    """
    # lazy: cost (megatron.core, 4-6 s: init_distributed's pure-torch processes import this module without it)
    from megatron.core import parallel_state
    # lazy: cost (megatron.core, as above)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    install_cpu_compat()
    apply_megatron_fixes()
    # lazy: cost (hydra + omegaconf via jtok_train.config, 0.3-0.6 s: pure-torch processes import compat too)
    from jtok_train.config.schema import expert_tensor_parallel_size

    etp = expert_tensor_parallel_size(tp=tp, ep=ep, etp=etp)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        **kwargs,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Tear down Megatron's process groups (safe to call when none exist)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None:  # never imported: nothing to tear down (and no 5 s import to pay)
        return
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def install_cpu_compat(import_megatron: bool = True) -> None:
    """Patch torch.cuda and Megatron-Core so that Megatron runs on CPU tensors. Idempotent; no-op on CUDA.

    import_megatron=False patches Megatron only if it is already imported (keeps pure-torch processes free
    of its 4-6 s import); init_model_parallel() calls it again with True. Calling it again after importing
    megatron modules outside the built-in list also proxies `torch` in those.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return
    if not _INSTALLED:
        _patch_torch_cuda()
        _patch_tensor_methods()
        _INSTALLED = True
    if import_megatron or "megatron.core" in sys.modules:
        _patch_megatron()


# ------------------------------------------------------------------------------------------- torch.cuda


class _CpuStream:
    """Stand-in for torch.cuda.Stream: CPU work is synchronous, so every wait/record is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_CpuEvent":
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:  # one CPU "stream": never "on a side stream"
        return isinstance(other, _CpuStream)

    def __hash__(self) -> int:
        return 0

    def __enter__(self) -> "_CpuStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _CpuEvent:
    """Stand-in for torch.cuda.Event (timing falls back to wall clock)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t = 0.0

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end._t - self._t) * 1000.0


_DEFAULT_STREAM = _CpuStream()


def _set(obj: Any, name: str, value: Any) -> None:
    """Replace obj.name, remembering the original once (for debugging: obj._jtok_orig_<name>)."""
    if not hasattr(obj, f"_jtok_orig_{name}"):
        setattr(obj, f"_jtok_orig_{name}", getattr(obj, name, None))
    setattr(obj, name, value)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # Megatron passes torch.cuda.current_device() as `device=`: answer the CPU.
    _set(cuda, "current_device", lambda: _CPU)
    # Called once per process by launch code and Megatron's init: nothing to select on CPU.
    _set(cuda, "set_device", lambda *a, **k: None)
    # CPU ops are synchronous.
    _set(cuda, "synchronize", lambda *a, **k: None)
    # DDP comm stream, MoE dtoh stream, shared-expert overlap: one synchronous CPU "stream".
    _set(cuda, "Stream", _CpuStream)
    _set(cuda, "Event", _CpuEvent)
    _set(cuda, "current_stream", lambda *a, **k: _DEFAULT_STREAM)
    _set(cuda, "default_stream", lambda *a, **k: _DEFAULT_STREAM)
    _set(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    # The CUDA RNG is the CPU generator here (RNG tracker add/fork, model_parallel_cuda_manual_seed).
    _set(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _set(cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator, not torch.manual_seed)
    _set(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _set(cuda, "manual_seed_all", lambda seed: torch.default_generator.manual_seed(int(seed)))
    if hasattr(cuda, "random"):
        _set(cuda.random, "get_rng_state", cuda.get_rng_state)
        _set(cuda.random, "set_rng_state", cuda.set_rng_state)
    # Megatron logs memory stats; there is no device memory to report.
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        _set(cuda, name, lambda *a, **k: 0)
    _set(cuda, "empty_cache", lambda: None)


def _called_from_megatron() -> bool:
    return sys._getframe(2).f_globals.get("__name__", "").startswith("megatron.")


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _patch_tensor_methods() -> None:
    T = torch.Tensor
    # CUDA streams only: CPU memory needs no cross-stream lifetime tracking.
    _set(T, "record_stream", lambda self, stream: None)

    orig_type = T._jtok_orig_type if hasattr(T, "_jtok_orig_type") else T.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
        # Megatron asserts param.type() == 'torch.cuda.FloatTensor' (optimizers, clip_grads): answer the
        # CUDA name, but only to callers inside megatron.* (everyone else sees the truth).
        if dtype is None and not kw and self.device.type == "cpu" and _called_from_megatron():
            name = _CUDA_TYPE_NAMES.get(self.dtype)
            if name is not None:
                return name
        return orig_type(self, dtype, non_blocking, **kw)

    _set(T, "type", type_)

    orig_cuda = T._jtok_orig_cuda if hasattr(T, "_jtok_orig_cuda") else T.cuda

    def cuda_(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Megatron moves tensors with .cuda() (shared embeddings with PP, optimizer state restore): stay on
        # CPU, for megatron.* callers only.
        if _called_from_megatron():
            return self
        return orig_cuda(self, *args, **kwargs)

    _set(T, "cuda", cuda_)


# --------------------------------------------------------------------------------------------- megatron


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return isinstance(dev, int) and not isinstance(dev, bool)  # an int device means a CUDA ordinal


def _cpu_device_kwarg(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "zeros_like", "ones_like", "empty_like", "full_like",
)  # fmt: skip


class _ModuleView(types.ModuleType):
    """A copy of a module's namespace with a few names replaced; misses fall through to the real module
    (lazy submodules, attributes set after the copy)."""

    def __init__(self, real: types.ModuleType, **replace: Any) -> None:
        super().__init__(real.__name__)
        self.__dict__.update(real.__dict__)
        self.__dict__.update(replace)
        self.__dict__["_jtok_real"] = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_jtok_real"], name)


class _DoneWork:
    """A finished async work handle (what an emulated collective returns for async_op=True)."""

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _avg_on_gloo(all_reduce: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None,
                async_op: bool = False) -> Any:
        # gloo has no ReduceOp.AVG (MoE aux-loss tracker, average_in_collective): SUM, then divide.
        if op == dist.ReduceOp.AVG and dist.get_backend(group) == "gloo":
            all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            tensor.div_(dist.get_world_size(group))
            return _DoneWork() if async_op else None
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    wrapper.__wrapped__ = all_reduce  # type: ignore[attr-defined]
    return wrapper


def _torch_for_megatron() -> types.ModuleType:
    """`torch` as seen from inside megatron.* modules: identical, except that tensor factories turn
    device="cuda" (hard-coded for masks, found_inf, grad-norm buffers, aux-loss trackers, token counts) into
    the CPU, and torch.distributed.all_reduce accepts ReduceOp.AVG on gloo."""
    factories = {n: _cpu_device_kwarg(getattr(torch, n)) for n in _FACTORIES if hasattr(torch, n)}
    dist_view = _ModuleView(dist, all_reduce=_avg_on_gloo(dist.all_reduce))
    return _ModuleView(torch, distributed=dist_view, **factories)


_PROXY: types.ModuleType | None = None


def _patch_megatron() -> None:
    global _PROXY
    try:
        # lazy: cost (megatron.core, 4-6 s: install_cpu_compat(import_megatron=False) goes without it)
        import megatron.core  # noqa: F401
    except ImportError:  # megatron-core not installed: only torch.cuda was patched
        return
    for name in _MEGATRON_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # another version may lack or break a module; patch what exists
            logger.debug("cpu compat: cannot import %s: %s", name, exc)
    if _PROXY is None:
        _PROXY = _torch_for_megatron()
    # Hard-coded device="cuda" tensors: give every loaded megatron module the proxied `torch`.
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("megatron.") and getattr(mod, "torch", None) is torch:
            mod.torch = _PROXY

    _patch_megatron_rng()
    _patch_megatron_moe()
    _patch_megatron_norm()


def _patch_megatron_rng() -> None:
    try:
        from megatron.core.tensor_parallel import random as mrandom  # lazy: version (absent: the patch is skipped)
    except ImportError:
        return
    # Megatron reads/writes torch.cuda.default_generators directly: use the CPU generator instead.
    if hasattr(mrandom, "_get_cuda_rng_state"):
        _set(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    if hasattr(mrandom, "_set_cuda_rng_state"):
        _set(mrandom, "_set_cuda_rng_state", lambda new_state, *a, **k: torch.set_rng_state(new_state))
    # fork() warns when the CPU RNG moved inside it; here the "GPU" RNG *is* the CPU RNG, so it always does.
    rng_logger = logging.getLogger(mrandom.__name__)
    if not any(isinstance(f, _DropForkWarning) for f in rng_logger.filters):
        rng_logger.addFilter(_DropForkWarning())


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_moe() -> None:
    try:
        from megatron.core.transformer.moe import moe_utils  # lazy: version (absent: the patch is skipped)
    except ImportError:
        return
    # Only bound when transformer-engine imports; the router references it unconditionally.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # The alltoall dispatcher turns split sizes into host lists only for CUDA tensors (`is_cuda`);
    # on CPU they would stay tensors, which all_to_all_single rejects as split sizes.
    if hasattr(moe_utils, "maybe_move_tensor_to_cpu") and not hasattr(
        moe_utils, "_jtok_orig_maybe_move_tensor_to_cpu"
    ):
        orig = moe_utils.maybe_move_tensor_to_cpu

        def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy()
            return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

        _set(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
        try:  # the dispatcher imported the name into its own namespace
            from megatron.core.transformer.moe import token_dispatcher  # lazy: version (absent: skipped)

            if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
                _set(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
        except ImportError:
            pass


def _patch_megatron_norm() -> None:
    # The local (torch) LayerNorm refuses sequence_parallel; nothing in it depends on the sequence layout,
    # so build it with sequence_parallel off and restore the flag for the layer's gradient all-reduce tag.
    try:
        from megatron.core.transformer import torch_norm  # lazy: version (absent: the patch is skipped)
    except ImportError:
        return
    cls = getattr(torch_norm, "WrappedTorchNorm", None)
    if cls is None or hasattr(cls, "_jtok_orig_new"):
        return
    orig_new = cls.__new__

    def __new__(klass: type, config: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "sequence_parallel", False):
            config = dataclasses.replace(config, sequence_parallel=False)
            norm = orig_new(klass, config, *args, **kwargs)
            for p in norm.parameters():
                setattr(p, "sequence_parallel", True)
            return norm
        return orig_new(klass, config, *args, **kwargs)

    cls._jtok_orig_new = orig_new
    cls.__new__ = staticmethod(__new__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
