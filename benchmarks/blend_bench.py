"""JTok-M's per-layer work on CPU, forward + backward over a stage's layers, measured side by side:

    .venv/bin/python benchmarks/blend_bench.py                   # the demo model's micro-batch and layers
    .venv/bin/python benchmarks/blend_bench.py --layers 24 --hidden 512

What one micro-batch costs JTok-M in the layers (the rows' gather, the blend of the K chosen rows, the
normalisation and scale) in two formulations of each of its two parts:

- the blend of the K rows: ``einsum("tk,tkd->td")`` (T batched [1, K] x [K, d] matmuls; what the reference
  computed before) vs a broadcast product summed over K (what ``jtokm_blend_reference`` computes now);
- the layers' rows out of the micro-batch's [U, L, n_e, d] buffer: ``rows[:, i]`` per layer (every layer's
  backward zero-fills and adds a whole [U, L, n_e, d] gradient) vs one ``unbind`` (``TokenRows.layer`` now).

Next to them, what JTok-M's module costs a micro-batch in all: ``JTokM`` itself (the router's RMSNorm and
[T, d] x [d, n_e] product, the top-K, the blend, the aux loss) over the L layers, forward + backward, the
gradient reaching the hidden states too.

One thread, cases interleaved, medians of ``--repeats`` x ``--inner``. Results: a markdown table and
benchmarks/results/blend.json. Every case's gradients are checked against the current formulation's first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "kernels"))

from jtok_kernels.ops import _l2n, jtokm_blend_reference  # noqa: E402

from jtok_train.model.jtok import JTokM  # noqa: E402
from jtok_train.tables.rows import TokenRows  # noqa: E402


def blend_einsum(unique_rows, inverse, top_logits, top_idx, scale, depth_factor, eps):
    """The reference's formulation before: the same math with the sum over K as an einsum."""
    top_scores = torch.sigmoid(top_logits)
    weights = top_scores / top_scores.sum(dim=-1, keepdim=True)
    U, n_e, d = unique_rows.shape
    flat = (inverse.unsqueeze(1) * n_e + top_idx).reshape(-1)
    rows = unique_rows.reshape(U * n_e, d).index_select(0, flat).view(*top_idx.shape, d)
    e = torch.einsum("tk,tkd->td", weights.to(rows.dtype), rows)
    return (depth_factor * scale) * _l2n(e, eps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="positions per micro-batch (demo: 4 x 256)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sets", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "blend.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    T, L, n_e, K, d = args.tokens, args.layers, args.sets, args.top_k, args.hidden
    unique_ids, inverse = torch.unique(torch.randint(0, args.vocab, (T,), generator=g), return_inverse=True)
    U = unique_ids.numel()
    buffer = torch.randn(U, L, n_e, d, generator=g, requires_grad=True)
    logits = [torch.randn(T, n_e, generator=g, requires_grad=True) for _ in range(L)]
    scale = torch.randn(d, generator=g, requires_grad=True)
    grad_out = torch.randn(T, d, generator=g)

    def step(blend, per_layer_index: bool):
        rows = TokenRows(unique_ids=unique_ids, unique_rows=buffer, inverse=inverse)
        total = 0.0
        for i in range(L):
            layer_rows = buffer[:, i] if per_layer_index else rows.layer(i)
            top_logits, top_idx = torch.topk(logits[i], K, dim=-1)
            total = total + (blend(layer_rows, inverse, top_logits, top_idx, scale, 0.3, 1e-6) * grad_out).sum()
        total.backward()

    cases = {
        "einsum, rows[:, i] per layer (before)": (blend_einsum, True),
        "einsum, one unbind": (blend_einsum, False),
        "broadcast sum, rows[:, i] per layer": (jtokm_blend_reference, True),
        "broadcast sum, one unbind (now)": (jtokm_blend_reference, False),
    }
    modules = [JTokM(d, n_e, K, L) for _ in range(L)]
    hidden = torch.randn(T, d, generator=g, requires_grad=True)

    def module_step():
        rows = TokenRows(unique_ids=unique_ids, unique_rows=buffer, inverse=inverse)
        total = 0.0
        for i, m in enumerate(modules):
            out = m(hidden, rows.layer(i), inverse)
            total = total + (out.residual * grad_out).sum() + out.aux_loss
        total.backward()

    grads = {}
    for name, (blend, per_layer) in cases.items():
        buffer.grad = scale.grad = None
        step(blend, per_layer)
        grads[name] = (buffer.grad.clone(), scale.grad.clone())
    ref = grads["broadcast sum, one unbind (now)"]
    # the four differ only in the order of the K-term sum inside einsum's matmul: fp32 rounding, 1e-5 relative
    for name, (gb, gs) in grads.items():
        for got, want in ((gb, ref[0]), (gs, ref[1])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    module_case = "the whole JTokM module (router, top-K, blend, aux loss), one unbind (now)"
    runs = {name: (lambda b=blend, p=per_layer: step(b, p)) for name, (blend, per_layer) in cases.items()}
    runs[module_case] = module_step
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.inner):
                run()
            times[name].append((time.perf_counter() - t0) / args.inner * 1e3)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["einsum, rows[:, i] per layer (before)"]
    print(f"T {T}, U {U}, L {L}, n_e {n_e}, K {K}, d {d}; forward + backward of all L layers, one thread\n")
    print("| formulation | ms | vs before |\n|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.2f} | {ms / base:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "unique_ids": U, "median_ms": med,
                                          "times_ms": times}, indent=1) + "\n")


if __name__ == "__main__":
    main()
