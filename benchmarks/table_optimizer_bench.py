"""The sharded table's per-step bookkeeping on one rank's shard, side by side (interleaved, medians):

    .venv/bin/python benchmarks/table_optimizer_bench.py                 # the demo model's shard on 2 ranks
    .venv/bin/python benchmarks/table_optimizer_bench.py --rows 2048 --layers 4 --sets 5 --hidden 128 --touched 900

1. the dense AdamW update of the whole shard: torch.optim.AdamW's single-tensor loop (what the table optimizer
   computed by hand before, bitwise), its for-each and its fused implementations, and ShardedTableOptimizer as
   it runs now (torch's fused kernel where the build has one);
2. the gradient bookkeeping around it: zeroing, the squared norm and the clipping multiply as the table did it
   before (over the whole shard, the norm as a sum of squares) vs ShardedTokenTable's methods now (one pass of
   torch.linalg.vector_norm, and only the touched rows when they are at most 1/8 of the shard), at ``--touched``
   rows (the demo model's 2-rank run touches ~900 of a rank's 2,048 rows per step: exchange/unique_ids) and at a
   large vocabulary's share (``--touched-small``, e.g. 4,000 of a 152k-id shard's 76k rows: 5%).

One thread (the training ranks run with OMP_NUM_THREADS=1). Writes benchmarks/results/table_optimizer.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jtok_train.tables.optimizer import ShardedTableOptimizer  # noqa: E402


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sets", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--touched", type=int, default=900)
    ap.add_argument("--touched-small", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "table_optimizer.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shape = (args.rows, args.layers, args.sets, args.hidden)
    g = torch.Generator().manual_seed(0)
    base, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    perm = torch.randperm(args.rows, generator=g)
    rows = perm[: args.touched].sort().values

    def torch_adamw(**impl):
        p = torch.nn.Parameter(base.clone())
        opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **impl)

        def step():
            p.grad = grad
            opt.step()
        return step

    t = SimpleNamespace(shard=base.clone(), shard_grad=grad.clone(), touched=torch.zeros(args.rows, dtype=torch.bool),
                        start_row=0, stop_row=args.rows)
    ours = ShardedTableOptimizer(t, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, kind="adamw")

    import torch.distributed as dist

    from jtok_train.compat import init_distributed
    from jtok_train.tables.sharded import ShardedTokenTable

    init_distributed("gloo")
    table = ShardedTokenTable(args.rows, args.layers, args.sets, args.hidden, group=dist.group.WORLD, init_std=0.02)
    small = perm[: args.touched_small].sort().values

    def before():
        g = table.shard_grad
        float(torch.sum(g.float() ** 2))
        g.mul_(0.5)
        g.zero_()

    def now(r):
        def fn():
            table.touched[r] = True
            table.grad_norm_sq()
            table.scale_grad(0.5)
            table.zero_grad()
        return fn

    cases = {
        "adamw single-tensor (the hand-written update before)": torch_adamw(foreach=False),
        "adamw foreach": torch_adamw(foreach=True),
        "adamw fused": torch_adamw(fused=True),
        "ShardedTableOptimizer (now)": lambda: ours.step(1e-3),
        "zero + norm + clip before (whole shard, sum of squares)": before,
        f"zero + norm + clip now, {args.touched} rows touched": now(rows),
        f"zero + norm + clip now, {args.touched_small} rows touched": now(small),
    }
    for fn in cases.values():      # warm-up (allocations, first-call dispatch)
        fn()
    times = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved: noise hits every case alike
        for k, fn in cases.items():
            times[k] += _timed(fn, args.iters)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    before_opt = med["adamw single-tensor (the hand-written update before)"]
    before_book = med["zero + norm + clip before (whole shard, sum of squares)"]
    now_book = med[f"zero + norm + clip now, {args.touched} rows touched"]
    report = {
        "shape": list(shape), "entries": base.numel(), "touched_rows": args.touched,
        "touched_rows_small": args.touched_small, "threads": 1, "torch": torch.__version__, "fused": ours.fused,
        "date": time.strftime("%Y-%m-%d"), "median_ms": med,
        "ratios": {"optimizer now / before": med["ShardedTableOptimizer (now)"] / before_opt,
                   "bookkeeping now / before": now_book / before_book,
                   "bookkeeping now / before, few rows touched":
                       med[f"zero + norm + clip now, {args.touched_small} rows touched"] / before_book,
                   "optimizer + bookkeeping now / before": (med["ShardedTableOptimizer (now)"] + now_book)
                   / (before_opt + before_book)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"shard {tuple(shape)} ({base.numel():,} entries), {args.touched} touched rows, 1 thread, "
          f"median of {args.repeats} x {args.iters}\n")
    print("| case | ms |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    print("\n" + ", ".join(f"{k}: {v:.3f}x" for k, v in report["ratios"].items()))
    return report


if __name__ == "__main__":
    main()
