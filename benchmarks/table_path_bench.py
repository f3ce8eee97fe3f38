"""The sharded table's own work per training step, without the model, on 2 gloo ranks:

    .venv/bin/python benchmarks/table_path_bench.py                      # the demo model's table and batch
    .venv/bin/python benchmarks/table_path_bench.py --optimizer sparse_adamw --profile

What JTok-M's table costs a step apart from the layers' math: per micro-batch the plan on the host, the ids and
rows exchanged, the rows' gradient sent back and summed by the owners; per step the global norm, the clipping,
the table optimizer and the zeroing. It is the demo's table exactly (``ShardedTokenTable`` +
``ShardedTableOptimizer`` as the trainer builds them: vocab 4,096, 4 layers, n_e 5, d 128, 2 micro-batches of
4 x 256 tokens per rank, the DP gradient scale 1/2) fed with windows of the demo corpus at random places (as
the shuffled loader: its dedup ratio), and a fixed random gradient in place of the layers' one. Measured: the wall time and the CPU
seconds (user + system of the rank's process, all threads) per step, medians over the steps after the first
``--warmup``; ``--profile``: the ops that take the time (torch's profiler, rank 0). Results: printed, and
benchmarks/results/table_path.json. Needs the demo data (`make demo`) or `--data-prefix` of another dataset.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist

    from jtok_train.compat import init_model_parallel
    from jtok_train.data.indexed import read_documents
    from jtok_train.tables.optimizer import ShardedTableOptimizer
    from jtok_train.tables.sharded import ShardedTokenTable

    init_model_parallel()
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = np.concatenate(read_documents(args.data_prefix)).astype(np.int64)
    if tokens.size <= args.seq or int(tokens.max()) >= args.vocab:
        raise SystemExit(f"{args.data_prefix}: {tokens.size} tokens, largest id {int(tokens.max())}: needs more than "
                         f"--seq {args.seq} tokens and ids below --vocab {args.vocab}; build the demo data (`make "
                         "demo`) or pass --data-prefix/--vocab")
    table = ShardedTokenTable(args.vocab, args.layers, args.sets, args.hidden, group=dist.group.WORLD, seed=1,
                              init_std=0.02, grad_scale=1.0 / world)
    opt = ShardedTableOptimizer(table, 0.1, (0.9, 0.95), 1e-8, kind=args.optimizer)
    b, s = args.micro_batch, args.seq
    grad = torch.randn((b * s, args.layers, args.sets, args.hidden), generator=torch.Generator().manual_seed(rank))
    rng = np.random.default_rng(rank)

    def step() -> None:
        batches = []
        for _ in range(args.micro_batches):   # b windows of s tokens at random places, as the shuffled loader
            starts = rng.integers(0, tokens.size - s, size=b)
            batches.append(torch.from_numpy(np.stack([tokens[i: i + s] for i in starts])))
        for ids in batches:          # as the trainer: every micro-batch announced before the first forward
            table.prefetch(ids)
        for ids in batches:
            rows = table.lookup(ids).unique_rows
            rows.backward(grad[: rows.shape[0]])
        table.finish_backward()
        norm = table.grad_norm_sq() ** 0.5
        table.scale_grad(min(1.0, 1.0 / (norm + 1e-6)))
        opt.step(1e-3)
        table.zero_grad()

    walls, cpus = [], []
    for i in range(args.steps):
        dist.barrier()
        t0, c0 = time.perf_counter(), _cpu_s()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    out = {"wall_s": statistics.median(walls[args.warmup:]), "cpu_s": statistics.median(cpus[args.warmup:]),
           "unique_ids_per_step": table.pop_stats()["exchange/unique_ids"] / args.steps}
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(args.profile_steps):
                step()
        if rank == 0:
            averages = prof.key_averages()
            rows = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:15]
            out["profile_ms_per_step"] = {e.key: e.self_cpu_time_total / 1e3 / args.profile_steps for e in rows}
            # every op the profile saw, with its calls: which ops ran does not depend on how busy the machine
            # is (the top 15 by time does: on a loaded machine the waits on the other rank fill it)
            out["profile_calls"] = {e.key: e.count for e in averages}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=23)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sparse_adamw"])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sets", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--data-prefix", default=str(ROOT / "data" / "demo" / "text_document"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "table_path.json"))
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")

    from jtok_train.testing import run_distributed

    per_rank = run_distributed(_run, 2, args, timeout=1800)
    report = {"args": vars(args), "ranks": per_rank,
              "wall_s": statistics.median(r["wall_s"] for r in per_rank),
              "cpu_s": statistics.median(r["cpu_s"] for r in per_rank)}
    print(f"table path per step ({args.optimizer}): wall {report['wall_s'] * 1e3:.1f} ms, CPU "
          f"{report['cpu_s'] * 1e3:.1f} ms per rank; unique ids per rank-step "
          f"{per_rank[0]['unique_ids_per_step']:.0f}")
    for name, ms in per_rank[0].get("profile_ms_per_step", {}).items():
        print(f"  {name:40s} {ms:7.2f} ms/step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
