"""jtok-train's side of the kernels: its JTok / JTok-M modules and whole Megatron models run the Triton kernels
(jtok_kernels) through the one dispatch point, jtok_kernels.ops, and agree with the references; the modules
run without Triton; the GPU kernel benchmark's code paths run at tiny sizes. The kernels themselves are tested
against their references in kernels/tests/test_kernels.py.

Tolerances: fp32 modules, rtol 1e-5 and atol 1e-5 x max|reference| (the kernels' own tolerance); the whole
model, rtol 1e-4 / atol 1e-5 x max|gradient| (two layers of fp32 sums in a different order).

Without CUDA the kernels run under Triton's interpreter: TRITON_INTERPRET=1 is set here, before the kernels
are imported.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402,F401  (a missing triton is a broken setup: the tests fail, they do not skip)

import jtok_kernels as kernels  # noqa: E402
from jtok_kernels import ops  # noqa: E402
from jtok_train.model.jtok import JTok, JTokM  # noqa: E402

if kernels.interpreted():
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    raise RuntimeError("the Triton kernels were imported without TRITON_INTERPRET=1 and there is no GPU: "
                       "run these tests in a fresh process")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread_and_restore_backend():
    torch.set_num_threads(1)
    old = ops.get_kernel_backend()
    yield
    ops.set_kernel_backend(old)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inverse(T: int, U: int, gen: torch.Generator) -> torch.Tensor:
    """T positions over U unique rows, row 3 used by over a third of them."""
    inv = torch.randint(0, U - 1, (T,), generator=gen)
    inv[: T // 3] = 3
    return inv[torch.randperm(T, generator=gen)].to(DEVICE)


def _grad_fn_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        stack.extend(n for n, _ in f.next_functions)
    return names


def test_modules_run_the_kernels_when_forced_and_the_reference_on_auto():
    gen = _gen(21)
    T, U, d, n_e, K = 57, 19, 44, 5, 2
    inverse = _inverse(T, U, gen)
    torch.manual_seed(0)
    jtok, jtokm = JTok(d).to(DEVICE), JTokM(d, n_e, K, num_layers=3, router_init_std=1.0).to(DEVICE)
    with torch.no_grad():
        jtok.scale.normal_()
    x = torch.randn(T, d, generator=gen).to(DEVICE)
    # the layer's rows are a slice of the micro-batch's [U, L, n_e, d] rows (strided, used in place)
    rows1 = torch.randn(U, 3, 1, d, generator=gen).to(DEVICE)
    rowsm = torch.randn(U, 2, n_e, d, generator=gen).to(DEVICE)
    out = {}
    for backend in ("triton", "reference", "auto"):
        ops.set_kernel_backend(backend)
        r1, rm = rows1.clone().requires_grad_(True), rowsm.clone().requires_grad_(True)
        h = x.view(19, 3, d).clone().requires_grad_(True)            # [s, b, d]
        y1 = jtok(h, r1[:, 1], inverse)
        res = jtokm(h, rm[:, 1], inverse)
        names = _grad_fn_names(y1) | _grad_fn_names(res.residual)
        loss = (y1 * y1).sum() + (res.residual * x.view_as(h)).sum() + res.aux_loss * 1e3
        params = [h, r1, rm, jtok.scale, jtokm.scale, jtokm.router, jtokm.router_norm.weight]
        out[backend] = (names, [y1, res.residual, res.aux_loss, *torch.autograd.grad(loss, params)])
    assert {"JTokGateBackward", "JTokMBlendBackward"} <= out["triton"][0]
    if DEVICE.type == "cpu":   # auto on CPU tensors: the reference
        assert not {"JTokGateBackward", "JTokMBlendBackward"} & out["auto"][0]
        assert ops.resolve_backend(x) == "reference"
    for a, b in zip(out["triton"][1], out["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max().clamp_min(1e-6)))


def _model_kernels_vs_reference() -> dict:
    """A whole JTok / JTok-M GPT model (Megatron layers): forward and every parameter gradient, kernels vs reference."""
    from jtok_train.compat import init_model_parallel
    from jtok_train.config import compose
    from jtok_train.model.builder import build_model

    torch.set_num_threads(1)
    worst = {}
    for variant in ("jtok", "jtokm"):
        cfg = compose(["model=tiny_dense", f"jtok={variant}", "model.num_layers=2", "model.hidden_size=40",
                       "model.ffn_hidden_size=72", "model.vocab_size=97", "model.seq_length=16", "jtok.scale_init=0.7",
                       "data.tokenizer=unused"])
        init_model_parallel(seed=5)
        model = build_model(cfg)
        ids = torch.randint(0, 31, (2, 16), generator=_gen(2))             # T = 32 positions, repeated ids
        pos = torch.arange(16).expand(2, 16)
        res = {}
        for backend in ("triton", "reference"):
            ops.set_kernel_backend(backend)
            model.zero_grad(set_to_none=True)
            logits = model(ids, pos, None)
            (logits.float().square().mean()).backward()
            res[backend] = (logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        (y_k, g_k), (y_r, g_r) = res["triton"], res["reference"]
        torch.testing.assert_close(y_k, y_r, rtol=1e-5, atol=1e-5)
        assert sorted(g_k) == sorted(g_r) and "token_table.weight" in g_k
        assert any(".jtok.scale" in n for n in g_k) and float(g_k["token_table.weight"].abs().max()) > 0
        err = 0.0
        for n in g_r:
            scale = float(g_r[n].abs().max().clamp_min(1e-12))
            torch.testing.assert_close(g_k[n], g_r[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
            err = max(err, float((g_k[n] - g_r[n]).abs().max()) / scale)
        worst[variant] = err
    return worst


def test_whole_model_kernels_vs_reference():
    """The Megatron layers call the ops through the modules: a JTok and a JTok-M model agree across backends."""
    from jtok_train.testing import run_distributed

    (worst,) = run_distributed(_model_kernels_vs_reference, 1, timeout=600)
    assert set(worst) == {"jtok", "jtokm"} and max(worst.values()) < 1e-4


def test_package_runs_without_triton():
    """No Triton on the machine: the modules import and run on the reference; forcing Triton says why not."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from jtok_kernels import ops\n"
        "from jtok_train.model.jtok import JTok\n"
        "assert ops.get_kernel_backend() == 'reference'\n"          # from JTOK_KERNELS
        "ops.set_kernel_backend('auto')\n"
        "y = JTok(8, scale_init=0.5)(torch.randn(5, 8), torch.randn(3, 8), torch.tensor([0, 1, 2, 1, 0]))\n"
        "assert y.shape == (5, 8) and ops.resolve_backend(y) == 'reference'\n"
        "ops.set_kernel_backend('triton')\n"
        "ops.resolve_backend(y)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "JTOK_KERNELS": " Reference "})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: JTOK_KERNELS=triton but Triton does not import (") and \
        last.endswith("install triton or use JTOK_KERNELS=auto or reference"), last


# ---------------------------------------------------------------------------------------------------
# The GPU benchmark's code path, at tiny sizes


@pytest.mark.e2e
def test_kernel_bench_check_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("kernel_bench", ROOT / "benchmarks" / "kernel_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels_gpu.json"
    records = bench.main(["--check", "--tokens", "19", "--hidden", "17", "--out", str(out)])
    assert [r["op"] for r in records] == ["jtok_gate fwd", "jtok_gate fwd+bwd", "jtokm_blend fwd",
                                          "jtokm_blend fwd+bwd", "segment_sum"]
    for r in records:
        assert r["T"] == 19 and r["d"] == 17 and 1 <= r["U"] < 19
        assert r["bytes_per_token"] > 2 * 17 and r["kernel_ms"] > 0 and r["eager_ms"] > 0
        assert r["max_abs_err"] < 0.1
    assert not out.exists()                 # --check never writes the results file


def test_kernel_bench_byte_floor():
    spec = importlib.util.spec_from_file_location("kernel_bench", ROOT / "benchmarks" / "kernel_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recs = {r["op"]: r for r in bench.main(["--bytes-only", "--tokens", "4099", "--hidden", "333", "--dtype", "bfloat16",
                                            "--bandwidth-gbs", "1000"])}
    gate = recs["jtok_gate fwd"]
    T, U, pairs, d = gate["T"], gate["U"], gate["row_set_pairs"], 333
    assert 1 < U < T and 2 * U <= pairs <= 5 * U        # Zipf ids repeat; each row: at least K = 2 sets, at most n_e = 5
    assert gate["bytes_per_token"] == pytest.approx(2 * d * 2 + U / T * d * 2)
    assert recs["jtokm_blend fwd"]["bytes_per_token"] == pytest.approx(d * 2 + pairs / T * d * 2 + 2 * (2 + 8))
    assert gate["floor_us"] == pytest.approx(gate["bytes_per_token"] * T / 1e12 * 1e6)
