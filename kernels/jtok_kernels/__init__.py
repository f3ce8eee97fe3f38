"""jtok_kernels: the JTok / JTok-M hot-path ops (fused JTok gate, fused JTok-M blend, deterministic segment
sums) as Triton kernels with their PyTorch references. Depends on torch (and triton for the kernels) only.

Call the ops through ``jtok_kernels.ops`` (``jtok_gate``, ``jtokm_blend``, ``segment_sum``): it holds the
references (the specification) and picks kernel or reference per call (``JTOK_KERNELS=auto|triton|reference``).
This package and ``ops`` import without Triton; the kernel modules (``segment``, ``jtok``, ``jtokm``) need it.

Each kernel has an autograd Function whose backward is also a kernel, accumulates in fp32 and is
deterministic: gradients of rows that many positions share are summed per unique row in a fixed order
(positions sorted by their unique index once, CSR offsets, one program per (unique row, column block)),
never with atomics.

On a machine without a GPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before this package's submodules are first imported (that is how the tests run them).
"""

from __future__ import annotations

import functools

__all__ = ["triton_import_error", "interpreted", "INTERPRET_HINT"]

INTERPRET_HINT = "TRITON_INTERPRET must be unset (it is read when the kernels are first imported)"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton and the kernels import, else the reason (one line)."""
    try:
        import jtok_kernels.segment  # noqa: F401  (imports triton)
    except ImportError as exc:   # no triton, or a triton without the language module
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    from jtok_kernels._common import INTERPRETED

    return INTERPRETED
