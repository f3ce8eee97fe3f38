"""The Triton kernels of the JTok hot path against their PyTorch references (jtok_kernels/ops.py).

Every kernel is checked forward and for every gradient on fresh random inputs: sizes that are not powers
of two, repeated ids (U < T), a unique row no position uses, an all-zero row (the norm's zero branch),
K = 1 and K = n_e, column blocks smaller than the row and segments longer than a loop step (the kernels'
loops and masks), fp32 and bf16. These tests import torch, triton and jtok_kernels only.

Tolerances: fp32, rtol 1e-5 and atol 1e-5 x max|reference|. bf16: the kernels compute in fp32 and round
once, the reference rounds at every step, so (1) kernel and bf16 reference agree within rtol 2e-2 and atol
2e-2 x max|reference|, and (2) against a float64 reference on the same bf16 inputs, the kernel's error is
at most 1.5x the bf16 reference's own error plus one bf16 ulp of max|reference| (2^-7 of it).

Without CUDA the kernels run under Triton's interpreter: TRITON_INTERPRET=1 is set here, before the
kernels are imported (nothing else in a CPU test run imports them earlier).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402,F401  (a missing triton is a broken setup: the tests fail, they do not skip)

import jtok_kernels as kernels  # noqa: E402
from jtok_kernels import _common, ops  # noqa: E402

if kernels.interpreted():
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    raise RuntimeError("the Triton kernels were imported without TRITON_INTERPRET=1 and there is no GPU: "
                       "run these tests in a fresh process (pytest kernels/tests)")

@pytest.fixture(autouse=True)
def _one_thread_and_restore_backend():
    torch.set_num_threads(1)
    old = ops.get_kernel_backend()
    yield
    ops.set_kernel_backend(old)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inverse(T: int, U: int, gen: torch.Generator) -> torch.Tensor:
    """T positions over U unique rows; row U-1 is used by no position, row 3 by over a third of them."""
    inv = torch.randint(0, U - 1, (T,), generator=gen)
    inv[: T // 3] = 3
    inv[T // 3 : T // 3 + 5] = 0
    return inv[torch.randperm(T, generator=gen)].to(DEVICE)


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=DEVICE, dtype=dtype).detach().requires_grad_(True)


# One bf16 ulp relative to the largest value: the kernels round their fp32 result once when they store
# it (Triton's interpreter rounds toward zero there, a GPU to nearest), the reference at every step.
BF16_ULP = 2.0**-7


def _assert_matches(got, want, oracle, dtype, what):
    """got/want: lists of tensors (kernel, reference in the same dtype); oracle: float64 reference or None."""
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}[{i}]: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{what}[{i}] has non-finite values"
        scale = float(w.detach().float().abs().max().clamp_min(1e-6))
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * scale, msg=f"{what}[{i}]")
        else:
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * scale, msg=f"{what}[{i}]")
            o = oracle[i].detach().double()
            err_kernel = float((g.detach().double() - o).abs().max())
            err_ref = float((w.detach().double() - o).abs().max())
            assert err_kernel <= 1.5 * err_ref + BF16_ULP * scale, f"{what}[{i}]: kernel error {err_kernel:.3g} vs bf16 reference {err_ref:.3g}"


def _run(fn, backend, inputs, grad_out):
    with ops.kernel_backend(backend):
        y = fn()
    grads = torch.autograd.grad(y, inputs, grad_out)
    return [y, *grads]


# ---------------------------------------------------------------------------------------------------
# JTok gate


@pytest.mark.parametrize("T,U,d,dtype,max_block", [
    (71, 29, 52, torch.float32, None),
    (53, 19, 40, torch.float32, 16),        # 3 column blocks, the last one masked
    (61, 23, 44, torch.bfloat16, None),
])
def test_jtok_gate_matches_reference(T, U, d, dtype, max_block, monkeypatch):
    if max_block:   # several column blocks, and segment loops of several steps (JTok-M's rows kernel: 16)
        monkeypatch.setattr(_common, "MAX_BLOCK_D", max_block)
        monkeypatch.setattr(_common, "BLOCK_P", 4)
    gen = _gen(T * 1000 + d)
    inverse = _inverse(T, U, gen)
    dm0, rows0, s0 = torch.randn(T, d, generator=gen), torch.randn(U, d, generator=gen), torch.randn(d, generator=gen)
    rows0[2] = 0.0                                           # zero row: normalize() gives 0, gradient c * dn
    g0 = torch.randn(T, d, generator=gen)
    results, oracle = {}, None
    for backend in ("triton", "reference"):
        dm, rows, s = _leaf(dm0, dtype), _leaf(rows0, dtype), _leaf(s0, dtype)
        results[backend] = _run(lambda: ops.jtok_gate(dm, rows, inverse, s, 1e-6), backend, (dm, rows, s),
                                g0.to(DEVICE, dtype))
    if dtype != torch.float32:
        dm, rows, s = (_leaf(t.to(dtype), torch.float64) for t in (dm0, rows0, s0))   # same rounded inputs
        oracle = _run(lambda: ops.jtok_gate(dm, rows, inverse, s, 1e-6), "reference", (dm, rows, s),
                      g0.to(DEVICE, dtype).double())
    _assert_matches(results["triton"], results["reference"], oracle, dtype, "jtok_gate [out, d_dm, d_rows, d_s]")
    assert torch.count_nonzero(results["triton"][2][U - 1]) == 0      # unused row: zero gradient


def test_jtok_gate_mixed_dtypes_and_empty():
    """bf16 activations with fp32 rows and scale (the gate is computed in fp32, the output is bf16)."""
    gen = _gen(5)
    T, U, d = 53, 17, 44
    inverse = _inverse(T, U, gen)
    dm0, rows0, s0 = torch.randn(T, d, generator=gen), torch.randn(U, d, generator=gen), torch.randn(d, generator=gen)
    g = torch.randn(T, d, generator=gen).to(DEVICE, torch.bfloat16)
    res = {}
    for backend in ("triton", "reference"):
        dm, rows, s = _leaf(dm0, torch.bfloat16), _leaf(rows0, torch.float32), _leaf(s0, torch.float32)
        res[backend] = _run(lambda: ops.jtok_gate(dm, rows, inverse, s, 1e-6), backend, (dm, rows, s), g)
    for a, b in zip(res["triton"], res["reference"]):
        assert a.dtype == b.dtype
        a, b = a.detach().float(), b.detach().float()
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
    # no positions at all: empty output, zero gradients
    with ops.kernel_backend("triton"):
        dm, rows, s = _leaf(torch.zeros(0, d), torch.float32), _leaf(rows0, torch.float32), _leaf(s0, torch.float32)
        y = ops.jtok_gate(dm, rows, torch.zeros(0, dtype=torch.long, device=DEVICE), s, 1e-6)
        assert y.shape == (0, d)
        d_rows, d_s = torch.autograd.grad(y.sum() + 0 * s.sum() + 0 * rows.sum(), (rows, s))
        assert torch.count_nonzero(d_rows) == 0 and torch.count_nonzero(d_s) == 0


# ---------------------------------------------------------------------------------------------------
# JTok-M blend


@pytest.mark.parametrize("T,U,d,n_e,K,dtype,max_block", [
    (57, 21, 40, 3, 1, torch.float32, None),     # K = 1: the weight is exactly 1, d_logits is 0
    (47, 17, 36, 4, 4, torch.float32, 16),       # K = n_e, 3 column blocks
    (53, 19, 44, 5, 2, torch.float32, None),     # the paper's n_e = 5, K = 2
    (51, 18, 40, 5, 2, torch.bfloat16, None),
    (43, 15, 28, 3, 3, torch.bfloat16, 16),      # K = n_e in bf16, 2 column blocks
])
def test_jtokm_blend_matches_reference(T, U, d, n_e, K, dtype, max_block, monkeypatch):
    if max_block:   # several column blocks, and segment loops of several steps (JTok-M's rows kernel: 16)
        monkeypatch.setattr(_common, "MAX_BLOCK_D", max_block)
        monkeypatch.setattr(_common, "BLOCK_P", 4)
    gen = _gen(T * 100 + n_e * 10 + K)
    inverse = _inverse(T, U, gen)
    rows0, s0 = torch.randn(U, n_e, d, generator=gen), torch.randn(d, generator=gen)
    rows0[2] = 0.0                                    # every candidate of row 2 is zero: e = 0 there
    # distinct logits, also in bf16 (>= 0.2 apart), so every dtype's top-K picks the same sets
    ranks = torch.argsort(torch.rand(T, n_e, generator=gen), dim=-1).float()
    logits0 = 0.6 * (ranks - n_e / 2) + 0.4 * (torch.rand(T, n_e, generator=gen) - 0.5)
    g0 = torch.randn(T, d, generator=gen)
    depth = 0.37

    def case(backend, dt):
        # the float64 oracle gets the same (bf16-rounded) input values
        rows, s, logits = _leaf(rows0.to(dtype), dt), _leaf(s0.to(dtype), dt), _leaf(logits0.to(dtype), dt)

        def fn():
            top_logits, top_idx = torch.topk(logits, K, dim=-1)
            return ops.jtokm_blend(rows, inverse, top_logits, top_idx, s, depth, 1e-6)

        return _run(fn, backend, (rows, logits, s), g0.to(DEVICE, dtype).to(dt))

    results = {b: case(b, dtype) for b in ("triton", "reference")}
    oracle = case("reference", torch.float64) if dtype != torch.float32 else None
    _assert_matches(results["triton"], results["reference"], oracle, dtype, "jtokm_blend [out, d_rows, d_logits, d_s]")
    d_rows = results["triton"][1]
    assert torch.count_nonzero(d_rows[U - 1]) == 0                  # unused row: zero gradient
    if K == 1:
        assert torch.count_nonzero(results["triton"][2]) == 0     # w = 1 whatever the logit
    else:
        assert float(results["triton"][2].abs().max()) > 0


def test_backward_is_deterministic():
    """Two backward passes on the same inputs give bitwise-equal gradients (no atomics anywhere)."""
    gen = _gen(11)
    T, U, d, n_e, K = 41, 7, 20, 5, 2           # few unique rows: long segments
    inverse = _inverse(T, U, gen)
    rows, s = _leaf(torch.randn(U, n_e, d, generator=gen), torch.float32), _leaf(torch.randn(d, generator=gen), torch.float32)
    logits = _leaf(torch.randn(T, n_e, generator=gen), torch.float32)
    g = torch.randn(T, d, generator=gen).to(DEVICE)

    def grads():
        with ops.kernel_backend("triton"):
            tl_, ti = torch.topk(logits, K, dim=-1)
            y = ops.jtokm_blend(rows, inverse, tl_, ti, s, 0.5, 1e-6)
        return torch.autograd.grad(y, (rows, logits, s), g)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Segment sums


@pytest.mark.parametrize("shape,dtype,max_block", [((3, 29), torch.float32, None), ((45,), torch.float32, 16),
                                                   ((2, 33), torch.bfloat16, None)])
def test_segment_sum_matches_index_add(shape, dtype, max_block, monkeypatch):
    if max_block:   # several column blocks, and segment loops of several steps (JTok-M's rows kernel: 16)
        monkeypatch.setattr(_common, "MAX_BLOCK_D", max_block)
        monkeypatch.setattr(_common, "BLOCK_P", 4)
    gen = _gen(sum(shape))
    T, U = 87, 31
    inverse = _inverse(T, U, gen)
    v0 = torch.randn(T, *shape, generator=gen)
    values = _leaf(v0, dtype)
    with ops.kernel_backend("triton"):
        got = ops.segment_sum(values, inverse, U + 2)            # two trailing empty segments
    want = ops.segment_sum_reference(values.detach(), inverse, U + 2)
    assert got.shape == (U + 2, *shape) and got.dtype == dtype
    assert torch.count_nonzero(got[U - 1 :]) == 0
    if dtype == torch.float32:
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-5)
        with ops.kernel_backend("triton"):                       # a fixed order: bitwise the same again
            assert torch.equal(ops.segment_sum(values.detach(), inverse, U + 2), got.detach())
    else:
        exact = ops.segment_sum_reference(v0.to(DEVICE, dtype).double(), inverse, U + 2)
        err_kernel, err_ref = float((got.detach().double() - exact).abs().max()), float((want.double() - exact).abs().max())
        assert err_kernel <= 1.5 * err_ref + BF16_ULP * float(exact.abs().max())
    g = torch.randn(U + 2, *shape, generator=gen).to(DEVICE, dtype)
    (d_values,) = torch.autograd.grad(got, values, g)
    assert torch.equal(d_values, g[inverse])


# ---------------------------------------------------------------------------------------------------
# Dispatch: callers call one function; the switch picks the implementation.


def test_backend_switch_and_errors(monkeypatch):
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"kernel backend='fast' is not a JTok kernel backend: use one of auto, triton, reference"):
        ops.set_kernel_backend("fast")
    ops.set_kernel_backend("reference")
    with ops.kernel_backend("triton"):
        assert ops.get_kernel_backend() == "triton" and ops.resolve_backend(x) == "triton"
    assert ops.get_kernel_backend() == "reference" and ops.resolve_backend(x) == "reference"
    monkeypatch.setattr(ops, "_backend", "bogus")                 # as if JTOK_KERNELS=bogus
    with pytest.raises(ValueError, match=r"JTOK_KERNELS='bogus' is not a JTok kernel backend"):
        ops.jtok_gate(x, x[:2], torch.zeros(4, dtype=torch.long, device=DEVICE), x[0], 1e-6)
    monkeypatch.setattr(ops, "_backend", "triton")
    # Triton kernels forced on a dtype they do not take: one line naming it and the fix
    xd = x.double()
    with pytest.raises(ValueError, match=r"got ffn_increment in torch.float64; use the reference backend"):
        ops.jtok_gate(xd, xd[:2], torch.zeros(4, dtype=torch.long, device=DEVICE), xd[0], 1e-6)
    with pytest.raises(ValueError, match=r"inverse has shape \(3,\), expected \[4\]"):
        ops.jtok_gate(x, x[:2], torch.zeros(3, dtype=torch.long, device=DEVICE), x[0], 1e-6)
    rows = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"K=4 must be in \[1, n_e=3\]"):
        ops.jtokm_blend(rows, torch.zeros(4, dtype=torch.long, device=DEVICE), torch.zeros(4, 4, device=DEVICE),
                        torch.zeros(4, 4, dtype=torch.long, device=DEVICE), x[0], 1.0, 1e-6)
    if DEVICE.type == "cpu":
        # forced on CPU tensors without the interpreter: a clear error, not a crash inside Triton
        monkeypatch.setattr(_common, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match=r"tensors are on cpu: .*TRITON_INTERPRET=1.*JTOK_KERNELS=auto or reference"):
            ops.segment_sum(x, torch.zeros(4, dtype=torch.long), 1)
        monkeypatch.setattr(_common, "INTERPRETED", True)
    # no Triton on the machine: forced -> clear error; auto -> reference
    monkeypatch.setattr(kernels, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match=r"JTOK_KERNELS=triton but Triton does not import \(ModuleNotFoundError"):
        ops.resolve_backend(x)
    monkeypatch.setattr(ops, "_backend", "auto")
    assert ops.resolve_backend(x) == "reference"


def test_ops_run_without_triton():
    """No Triton on the machine: the ops import and run their references; forcing Triton says why not."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from jtok_kernels import ops\n"
        "assert ops.get_kernel_backend() == 'reference'\n"          # from JTOK_KERNELS
        "ops.set_kernel_backend('auto')\n"
        "x = torch.randn(5, 8)\n"
        "y = ops.jtok_gate(x, torch.randn(3, 8), torch.tensor([0, 1, 2, 1, 0]), torch.full((8,), 0.5), 1e-6)\n"
        "assert y.shape == (5, 8) and ops.resolve_backend(y) == 'reference'\n"
        "ops.set_kernel_backend('triton')\n"
        "ops.resolve_backend(y)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "JTOK_KERNELS": " Reference "})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: JTOK_KERNELS=triton but Triton does not import (") and \
        last.endswith("install triton or use JTOK_KERNELS=auto or reference"), last


# ---------------------------------------------------------------------------------------------------
# What the interpreter cannot check: the kernels lower to a cubin (Triton's compiler + bundled ptxas, no GPU)


@pytest.mark.e2e
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "jtok_kernels.compile_check", "--arch", "90", "--dtype", "bf16"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if "| sm_90 |" in line]
    assert len(rows) == 8, proc.stdout                       # 8 kernels (bf16: loads, fp32 math, stores)
    for kernel, dtype, arch, warps, regs, spill in (map(str.strip, r) for r in rows):
        assert 0 < int(regs) <= 255 and int(spill) == 0, f"{kernel} {dtype}: {regs} registers, {spill} bytes spilled"
