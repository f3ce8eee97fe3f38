"""JTok hot-path kernels on a GPU: Triton kernel vs eager PyTorch reference, and bytes moved per token
against the memory-bandwidth floor.

    python benchmarks/kernel_bench.py                        # GPU: d 2048 and 4096, T 16384, n_e 5, K 2, bf16
    python benchmarks/kernel_bench.py --hidden 1024 --tokens 8192 --dtype float32
    python benchmarks/kernel_bench.py --check                # CPU or GPU: tiny sizes, exercises every code path
    python benchmarks/kernel_bench.py --bytes-only           # any machine: the byte floor per op, no kernels run

Every op is timed forward alone and forward + backward, for the kernel (``JTOK_KERNELS=triton``) and the
eager reference (``reference``), on the same inputs: token ids drawn from a Zipf(1.1) law over a 128k
vocabulary, deduplicated as the model does, so U/T is realistic. Before timing, outputs and gradients are
compared (max abs error is recorded).

Bytes per token are a lower bound on DRAM traffic for the op: each activation read/written once, each
unique row read (and its gradient written) once per micro-batch, the K logits and ids read once. The floor
time is those bytes over the device's copy bandwidth (measured here with a large device-to-device copy:
read + write). "of floor" = floor time / measured time (1.0 = at the bandwidth limit).

On CUDA the results go to benchmarks/results/kernels_gpu.json. Without CUDA only ``--check`` runs (Triton's
interpreter, tiny sizes) and nothing is written: timings there measure the interpreter, not the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if not torch.cuda.is_available():
    # The kernels run on CPU tensors only under the interpreter, which must be on before they are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from jtok_kernels import ops  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "kernels_gpu.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def zipf_ids(T: int, vocab: int, alpha: float, gen: torch.Generator, device) -> torch.Tensor:
    p = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-alpha)
    ids = torch.multinomial(p / p.sum(), T, replacement=True, generator=gen)
    return ids.to(device)


def bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    t = timed(lambda: y.copy_(x), device, iters=20)
    return 2 * x.numel() / t / 1e9


def timed(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor_bytes_per_token(T: int, U: int, pairs: int, d: int, n_e: int, K: int, b: int) -> dict:
    """Least DRAM bytes per token of each op: activations read/written once, the rows used read once per
    micro-batch (``pairs`` = distinct (unique row, set) pairs the top-K picked), row gradients written once
    (dense [U, n_e, d], as autograd needs them), K logits + int64 ids. b = bytes per element."""
    u, p = U / T, pairs / T
    gate_f = 2 * d * b + u * d * b                              # dm in, out; rows
    gate_b = 3 * d * b + 2 * u * d * b                          # g, dm in, d_dm out; rows in, d_rows out
    blend_f = d * b + p * d * b + K * (b + 8)                   # out; chosen rows; logits + ids
    blend_b = d * b + p * d * b + u * n_e * d * b + K * (2 * b + 8)   # g; rows; d_rows; logits, ids, d_logits
    return {"jtok_gate fwd": gate_f, "jtok_gate fwd+bwd": gate_f + gate_b, "jtokm_blend fwd": blend_f,
            "jtokm_blend fwd+bwd": blend_f + blend_b, "segment_sum": n_e * d * b + u * n_e * d * b}


def batch_ids(T: int, n_e: int, K: int, vocab: int, gen: torch.Generator, device) -> tuple:
    """Zipf token ids -> (inverse, U, top-K logits, top-K ids, distinct (row, set) pairs)."""
    ids = zipf_ids(T, vocab, 1.1, gen, device)
    _, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    U = int(inverse.max()) + 1
    logits = torch.randn(T, n_e, generator=gen).to(device)
    top_logits, top_idx = torch.topk(logits, K, dim=-1)
    pairs = int(torch.unique(inverse.unsqueeze(1) * n_e + top_idx).numel())
    return inverse, U, top_logits, top_idx, pairs


def make_ops(T: int, d: int, n_e: int, K: int, vocab: int, dtype, device, seed: int) -> tuple[dict, dict]:
    """{op name: (fn() -> list of tensors, least bytes per token)} and the input summary."""
    gen = torch.Generator().manual_seed(seed)
    inverse, U, top_logits, top_idx, pairs = batch_ids(T, n_e, K, vocab, gen, device)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    dm, rows1, scale = rnd(T, d), rnd(U, d), rnd(d)
    rowsm = rnd(U, n_e, d)
    top_logits = top_logits.to(dtype).requires_grad_(True)
    g = torch.randn(T, d, generator=gen).to(device=device, dtype=dtype)
    seg_vals = torch.randn(T, n_e * d, generator=gen).to(device=device, dtype=dtype)
    floor = floor_bytes_per_token(T, U, pairs, d, n_e, K, torch.finfo(dtype).bits // 8)

    def gate():
        return ops.jtok_gate(dm, rows1, inverse, scale, 1e-6)

    def blend():
        return ops.jtokm_blend(rowsm, inverse, top_logits, top_idx, scale, 0.1, 1e-6)

    def fwd_bwd(fn, inputs):
        def run():
            y = fn()
            return [y, *torch.autograd.grad(y, inputs, g)]
        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return [fn()]
        return run

    fns = {
        "jtok_gate fwd": no_grad(gate),
        "jtok_gate fwd+bwd": fwd_bwd(gate, (dm, rows1, scale)),
        "jtokm_blend fwd": no_grad(blend),
        "jtokm_blend fwd+bwd": fwd_bwd(blend, (rowsm, top_logits, scale)),
        "segment_sum": lambda: [ops.segment_sum(seg_vals, inverse, U)],
    }
    table = {name: (fn, floor[name]) for name, fn in fns.items()}
    return table, {"T": T, "U": U, "row_set_pairs": pairs, "d": d, "n_e": n_e, "K": K, "dtype": str(dtype).replace("torch.", "")}


def _max_err(a: list, b: list) -> float:
    return max(float((x.detach().float() - y.detach().float()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def bytes_model(args) -> list[dict]:
    """The byte floor alone (no kernels run, any machine): bytes per token and floor time at a bandwidth."""
    dtype = DTYPES[args.dtype]
    records = []
    for d in args.hidden or [2048, 4096]:
        T = args.tokens or 16384
        _, U, _, _, pairs = batch_ids(T, args.n_e, args.top_k, 131072, torch.Generator().manual_seed(args.seed), "cpu")
        for op, bpt in floor_bytes_per_token(T, U, pairs, d, args.n_e, args.top_k, torch.finfo(dtype).bits // 8).items():
            records.append({"op": op, "T": T, "U": U, "row_set_pairs": pairs, "d": d, "dtype": args.dtype,
                            "bytes_per_token": bpt, "floor_us": bpt * T / (args.bandwidth_gbs * 1e9) * 1e6})
    print(f"byte floor at {args.bandwidth_gbs:.0f} GB/s (n_e {args.n_e}, K {args.top_k}, {args.dtype}, Zipf(1.1) ids over 128k)")
    print("| op | T | U | (row, set) pairs | d | bytes/token | floor us |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['op']} | {r['T']} | {r['U']} | {r['row_set_pairs']} | {r['d']} | {r['bytes_per_token']:.0f} | "
              f"{r['floor_us']:.1f} |")
    return records


def run(args) -> list[dict]:
    if args.bytes_only:
        return bytes_model(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.check:
        shapes = [(args.tokens or 48, d) for d in (args.hidden or [40])]
        vocab, iters = 64, 1
    else:
        if device.type != "cuda":
            raise SystemExit("kernel_bench: no CUDA device here; the GPU benchmark needs one (use --check to exercise "
                             "the code path on CPU under Triton's interpreter)")
        shapes = [(args.tokens or 16384, d) for d in (args.hidden or [2048, 4096])]
        vocab, iters = 131072, args.iters
    dtype = DTYPES[args.dtype]
    bw = bandwidth_gbs(device)
    records = []
    for T, d in shapes:
        table, info = make_ops(T, d, args.n_e, args.top_k, vocab, dtype, device, args.seed)
        for name, (fn, bytes_per_token) in table.items():
            with ops.kernel_backend("triton"):
                out_k = fn()
            with ops.kernel_backend("reference"):
                out_r = fn()
            err = _max_err(out_k, out_r)
            tol = 5e-2 if dtype != torch.float32 else 1e-3
            scale = max(float(t.detach().float().abs().max()) for t in out_r if t.numel())
            if not err <= tol * max(1.0, scale):
                raise SystemExit(f"kernel_bench: {name} differs from the reference by {err:.3g} (scale {scale:.3g})")
            times = {}
            for backend in ("triton", "reference"):
                with ops.kernel_backend(backend):
                    times[backend] = timed(fn, device, iters=iters, warmup=0 if args.check else 3)
            floor_s = bytes_per_token * T / (bw * 1e9)
            records.append({**info, "op": name, "bytes_per_token": round(bytes_per_token, 1),
                            "kernel_ms": times["triton"] * 1e3, "eager_ms": times["reference"] * 1e3,
                            "speedup": times["reference"] / times["triton"],
                            "floor_ms": floor_s * 1e3, "kernel_of_floor": floor_s / times["triton"],
                            "max_abs_err": err})
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (Triton interpreter)'}; "
          f"copy bandwidth {bw:.0f} GB/s")
    print("| op | T | U | d | bytes/token | kernel ms | eager ms | speedup | floor ms | kernel of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['op']} | {r['T']} | {r['U']} | {r['d']} | {r['bytes_per_token']:.0f} | {r['kernel_ms']:.3f} | "
              f"{r['eager_ms']:.3f} | {r['speedup']:.2f}x | {r['floor_ms']:.3f} | {r['kernel_of_floor']:.0%} |")
    if device.type == "cuda" and not args.check:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bw, "torch": torch.__version__,
                "triton": __import__("triton").__version__, "n_e": args.n_e, "top_k": args.top_k,
                "dtype": args.dtype, "iters": iters}
        out.write_text(json.dumps({"meta": meta, "results": records}, indent=1) + "\n")
        print(f"wrote {out}")
    return records


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="tiny sizes, any device (interpreter on CPU); writes nothing")
    p.add_argument("--bytes-only", action="store_true",
                   help="print the byte floor per op (no kernels run, any machine) at --bandwidth-gbs")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                   help="bandwidth for --bytes-only (default 3350: H100 SXM nominal HBM3)")
    p.add_argument("--tokens", type=int, default=None, help="positions per micro-batch T (default 16384; check 48)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden sizes d (default 2048 4096; check 40)")
    p.add_argument("--n-e", dest="n_e", type=int, default=5)
    p.add_argument("--top-k", dest="top_k", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    return run(parse(argv))


if __name__ == "__main__":
    main()
