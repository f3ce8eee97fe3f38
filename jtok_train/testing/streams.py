"""A recording stand-in for the CUDA stream calls of the exchange (``jtok_train.tables.exchange.CudaStreams``),
for CPU tests of the stream discipline that a CPU run cannot otherwise show.

``RecordingStreams`` keeps a current stream (``compute`` until a ``use(side)`` block) and, through a
``TorchFunctionMode`` active while it checks, the stream each tensor's storage was made on and the last time each
stream read a storage. It reports, as a CUDA caching allocator and stream semantics would make them:

- ``read before wait``: a stream reads a storage another stream made, and has not waited for that stream since;
- ``read without record_stream``: the same, without ``record_stream`` of the storage on the reading stream (its
  memory could be handed to a kernel of the making stream once the maker drops it);
- ``write while read``: a stream writes (in place, ``out=``, ``__setitem__``) a storage another stream read, and
  has not waited for that stream since.

Tensors the mode never saw made (parameters, autograd's gradients, collectives' results in buffers made
before) count as made on the compute stream, which is where a training step makes them. Autograd runs backward
functions without the caller's modes, so every side-stream block checks its own ops (the backward's compute
ops outside them go unseen: they are all on the compute stream). Every tensor the mode
sees is kept alive until ``stop()``, so a storage address is never reused while it is tracked. Only ops that go
through Python's torch function dispatch are seen (torch.*, Tensor methods): the exchange's own code is.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["RecordingStreams", "FakeStream"]


class FakeStream:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


COMPUTE = FakeStream("compute")
_WRITES = {"__setitem__", "index_put_", "index_add_", "copy_", "zero_", "fill_", "add_", "mul_", "scatter_",
           "scatter_add_", "masked_fill_", "index_copy_", "sub_", "div_", "clamp_"}


# ops that read a tensor's metadata only (shape, dtype, device), never its memory
_METADATA = {"__len__", "size", "dim", "numel", "element_size", "is_contiguous", "stride", "__get__",
             "data_ptr", "untyped_storage", "is_floating_point", "is_complex", "__hash__"}


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() if t.numel() else None
    except RuntimeError:   # tensors without storage (meta, some subclasses)
        return None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class RecordingStreams:
    """CudaStreams' interface (new_stream, current, use, wait, record) on CPU, checking every cross-stream use."""

    def __init__(self) -> None:
        self.current_stream = COMPUTE
        self.clock = 0
        self.maker: dict[int, tuple[FakeStream, int]] = {}                 # storage -> (stream, time made)
        self.reads: dict[int, dict[FakeStream, int]] = defaultdict(dict)   # storage -> stream -> last read
        self.waited: dict[tuple[FakeStream, FakeStream], int] = {}         # (waiter, other) -> time of the wait
        self.recorded: set[tuple[int, FakeStream]] = set()
        self.violations: list[str] = []
        self.counts = defaultdict(int)                                      # what happened (tests assert it did)
        self._alive: list[torch.Tensor] = []
        self._mode: _Mode | None = None
        self._host: set[int] = set()

    # -- CudaStreams' interface ---------------------------------------------------------------------------
    def new_stream(self, device: Any) -> FakeStream:
        self.counts["streams"] += 1
        return FakeStream(f"side{self.counts['streams']}")

    def current(self) -> FakeStream:
        return self.current_stream

    @contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        before, self.current_stream = self.current_stream, stream
        self.counts["side_blocks"] += stream is not COMPUTE
        # autograd runs backward functions (the row gradients' send) without the caller's torch function
        # modes: a side-stream block always checks its own ops
        mode = _Mode(self) if self._mode is not None else None
        try:
            if mode is not None:
                with mode:
                    yield
            else:
                yield
        finally:
            self.current_stream = before

    def wait(self, waiter: FakeStream, other: FakeStream) -> None:
        self.clock += 1
        self.waited[(waiter, other)] = self.clock
        self.counts["waits"] += 1

    def record(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        key = _storage(tensor)
        if key is not None:
            self.recorded.add((key, stream))
            self._alive.append(tensor)
        self.counts["records"] += 1

    # -- checking -------------------------------------------------------------------------------------------
    def host(self, *tensors: torch.Tensor) -> None:
        """Declare host-memory tensors (on a GPU they are CPU tensors, outside stream ordering: the row
        placement's lookup table, read with ids copied to the host)."""
        for t in tensors:
            key = _storage(t)
            if key is not None:
                self._host.add(key)
                self._alive.append(t)

    def start(self) -> None:
        self._mode = _Mode(self)
        self._mode.__enter__()

    def stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._alive.clear()

    def _read(self, t: torch.Tensor, what: str) -> None:
        key = _storage(t)
        if key is None or key in self._host:
            return
        s = self.current_stream
        maker, made = self.maker.get(key, (COMPUTE, 0))
        if maker is not s:
            self.counts["cross_stream_reads"] += 1
            if self.waited.get((s, maker), -1) < made:
                self.violations.append(f"read before wait: {what} reads on {s.name} a tensor {tuple(t.shape)} made "
                                       f"on {maker.name} without waiting for it")
            if (key, s) not in self.recorded:
                self.violations.append(f"read without record_stream: {what} reads on {s.name} a tensor "
                                       f"{tuple(t.shape)} made on {maker.name}")
        self.reads[key][s] = self.clock

    def _write(self, t: torch.Tensor, what: str) -> None:
        key = _storage(t)
        if key is None:
            return
        s = self.current_stream
        for other, when in self.reads.get(key, {}).items():
            if other is not s and self.waited.get((s, other), -1) < when:
                self.violations.append(f"write while read: {what} writes on {s.name} a tensor {tuple(t.shape)} that "
                                       f"{other.name} read without {s.name} waiting for it")

    def _made(self, t: torch.Tensor) -> None:
        key = _storage(t)
        if key is None:
            return
        # a view or in-place result keeps its storage's maker; a new storage belongs to the current stream
        self.maker.setdefault(key, (self.current_stream, self.clock))
        self._alive.append(t)


class _Mode(TorchFunctionMode):
    def __init__(self, rec: RecordingStreams):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        name = getattr(func, "__name__", str(func))
        rec.clock += 1
        writes = name in _WRITES or (name.endswith("_") and not name.startswith("__"))
        targets = []
        if writes and args and isinstance(args[0], torch.Tensor):
            targets.append(args[0])
        if "out" in kwargs:
            targets += list(_tensors(kwargs["out"]))
        if name in _METADATA:
            return func(*args, **kwargs)
        for t in _tensors((args, kwargs)):
            rec._read(t, name)
        for t in targets:
            rec._write(t, name)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            rec._made(t)
        return out
