"""Counting device-to-host reads in the CPU twin (on CUDA ``torch.cuda.set_sync_debug_mode`` does this).

On a GPU a read of a device tensor's values by the host (``.item()``, ``int()``, ``.tolist()``, ``.cpu()``,
``torch.equal``, ``torch.nonzero``/``torch.unique``, whose output size depends on the data) stalls the host
until the device has caught up. The exchange keeps every host-side value in numpy (the plan, counts, ids,
owner-side indices), so in the CPU twin any such read of a **torch** tensor inside the counted code is one that
would sync on a GPU. ``DeviceReads.counting(name)`` counts them while a block runs: scalar reads and
data-dependent ops through a ``TorchDispatchMode``, and the methods that bypass the dispatcher (``tolist``,
``cpu``, ``numpy``) through wrappers installed for the counter's lifetime.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DeviceReads"]

# ops whose result the host must wait for on CUDA (a scalar read, or an output sized by the data)
SYNC_OPS = {"_local_scalar_dense", "equal", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
            "masked_select", "argwhere"}


class _Mode(TorchDispatchMode):
    def __init__(self, hit: Callable[[str], None]):
        super().__init__()
        self.hit = hit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.hit(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class DeviceReads:
    """``with DeviceReads() as reads:`` then ``with reads.counting("lookup"): ...`` or ``reads.wrap(obj,
    "method")``; ``reads.counts`` maps a name to its reads, ``reads.ops`` what they were."""

    BYPASS = ("tolist", "cpu", "numpy")

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.ops: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()   # calls of each wrapped method
        self._active: list[str | None] = []   # innermost counted block (None: an exempt host-only call)
        self._saved: list[tuple[Any, str, Any]] = []

    def _hit(self, what: str) -> None:
        if self._active and self._active[-1] is not None:
            self.counts[self._active[-1]] += 1
            self.ops[f"{self._active[-1]}: {what}"] += 1

    def __enter__(self) -> "DeviceReads":
        for name in self.BYPASS:
            real = getattr(torch.Tensor, name)

            @functools.wraps(real)
            def wrapper(t, *a, _real=real, _name=name, **k):
                self._hit(f"Tensor.{_name}")
                return _real(t, *a, **k)

            self._saved.append((torch.Tensor, name, real))
            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()

    @contextlib.contextmanager
    def counting(self, name: str) -> Iterator[None]:
        self.counts[name] += 0
        self._active.append(name)
        try:
            with _Mode(self._hit):
                yield
        finally:
            self._active.pop()

    def wrap(self, owner: Any, method: str, name: str | None = None) -> None:
        """Count the reads of ``owner.method`` (an instance or a class) for the counter's lifetime."""
        real = getattr(owner, method)
        label = name or method

        @functools.wraps(real)
        def counted(*a, **k):
            self.calls[label] += 1
            with self.counting(label):
                return real(*a, **k)

        self._saved.append((owner, method, owner.__dict__.get(method, real) if isinstance(owner, type) else real))
        setattr(owner, method, counted)

    def exempt(self, owner: Any, name: str) -> None:
        """Do not count inside ``owner.name``: a function whose contract is host tensors only (it refuses a
        device tensor), so its reads are host reads on a GPU too (e.g. ``exchange.host_ids``)."""
        real = getattr(owner, name)

        @functools.wraps(real)
        def quiet(*a, **k):
            self._active.append(None)
            try:
                return real(*a, **k)
            finally:
                self._active.pop()

        self._saved.append((owner, name, real))
        setattr(owner, name, quiet)
