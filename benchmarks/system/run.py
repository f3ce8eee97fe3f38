"""The system figures of JTok-M on CPU, measured side by side in one run:

    .venv/bin/python benchmarks/system/run.py                       # config "tiny", 2 ranks
    .venv/bin/python benchmarks/system/run.py --config bench --steps 8 --repeats 2

1. training step time on 2 gloo ranks: backbone alone vs + JTok-M replicated / sharded / sharded + overlap
   (and sharded without dedup), variants interleaved A B C D E A B C D E ... so that machine noise hits all
   of them alike, each run in fresh processes (see benchmarks/exchange_bench.py); medians over the steps after
   the first two of every repeat;
2. exchange bytes per step vs the unique-row floor (every remote unique id once: its id, its row forward, its
   gradient back) and vs the exchange without dedup;
3. exposed exchange time (the time the compute waited on rows) with and without overlap;
4. peak memory per rank (resident set, sampled every 5 ms while each variant trains; growth over the
   process's resident set before the variant was built);
5. decode tokens/s with the JTok-M tables in host memory vs the backbone alone (benchmarks/decode_bench.py);
6. what JTok-M adds, op by op: the backbone and JTok-M sharded + overlap trained once more each under torch's
   profiler (after the timed runs, so profiling does not touch the step times); self CPU time per step of
   every op, JTok-M minus backbone, largest first (rank 0; ``--profile-top N`` rows, 0 = off).

Needs the demo data (`make demo`, or `jtok-data build --source python-docs --out data/demo --vocab-size 4096`).
Writes benchmarks/results/system.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "backbone": ["jtok=none"],
    "jtokm_replicated": ["jtok=jtokm", "parallel.embedding=replicated"],
    "jtokm_sharded": ["jtok=jtokm", "parallel.embedding=sharded", "parallel.overlap=false"],
    "jtokm_sharded_overlap": ["jtok=jtokm", "parallel.embedding=sharded", "parallel.overlap=true"],
    "jtokm_sharded_no_dedup": ["jtok=jtokm", "parallel.embedding=sharded", "parallel.overlap=true",
                               "parallel.dedup=false"],
}
# the demo model ("tiny") and a wider one ("bench"): the same configs as the exchange benchmark
from benchmarks.exchange_bench import CONFIGS, fresh_process_runs  # noqa: E402

EXCHANGE_KEYS = ("exchange/bytes_sent", "exchange/bytes_received", "exchange/wait_s", "exchange/positions",
                 "exchange/unique_ids", "exchange/rows_remote", "exchange/rows_requested")


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak - start`` is the growth."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _row_bytes(trainer) -> int:
    """Bytes of one token's rows over all layers and row sets (what one id fetches)."""
    table = trainer.module.table
    if table is None:
        return 0
    cfg = trainer.cfg
    weight = getattr(table, "shard", None)
    if weight is None:
        weight = next(table.parameters())
    return cfg.model.num_layers * cfg.jtok.num_sets * cfg.model.hidden_size * weight.element_size()


PROFILED = ("backbone", "jtokm_sharded_overlap")


def _profiled_fit(tr) -> dict[str, float]:
    """tr.fit() under torch's profiler: self CPU seconds per op name, summed over the run."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tr.fit()
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def _measure(runs: list[tuple[str, list[str]]]) -> list[dict]:
    """Runs on every rank: trains each variant in turn, returns per-variant figures of this rank. A variant
    named "profile:<variant>" is trained under the profiler and returns its per-op self times only."""
    import torch.distributed as dist

    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer

    out = []
    for variant, overrides in runs:
        gc.collect()
        dist.barrier()
        if variant.startswith("profile:"):
            tr = build_trainer(compose(overrides))
            out.append({"variant": variant, "ops": _profiled_fit(tr), "steps": tr.cfg.train.train_iters})
            del tr
            dist.barrier()
            continue
        with PeakRSS() as mem:
            tr = build_trainer(compose(overrides))
            tr.fit()
        rows = [json.loads(l) for l in (Path(tr.run_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "step_time_s" in r][2:]
        rec = {"variant": variant, "step_time_s": [r["step_time_s"] for r in steps],
               "peak_rss_mb": mem.peak / 2**20, "rss_growth_mb": (mem.peak - mem.start) / 2**20,
               "row_bytes": _row_bytes(tr)}
        for key in EXCHANGE_KEYS:
            vals = [r[key] for r in steps if key in r]
            if vals:
                rec[key] = statistics.median(vals)
        out.append(rec)
        del tr
        dist.barrier()
    return out


def _training_section(args) -> dict:
    runs = []
    for rep in range(args.repeats):
        for variant, ov in VARIANTS.items():
            runs.append((variant, CONFIGS[args.config] + ov + [
                "data=demo", "train=demo", f"train.train_iters={args.steps}", "train.save=false",
                "train.progress=false", "logging.wandb=false", "train.eval_samples=8",
                f"train.run_dir={args.work}/{args.config}_{variant}_{rep}"]))
    if args.profile_top:
        for variant in PROFILED:
            runs.append((f"profile:{variant}", CONFIGS[args.config] + VARIANTS[variant] + [
                "data=demo", "train=demo", f"train.train_iters={args.steps}", "train.save=false",
                "train.progress=false", "logging.wandb=false", "train.eval_samples=8",
                f"train.run_dir={args.work}/{args.config}_{variant}_profile"]))
    per_rank = fresh_process_runs(_measure, args.ranks, runs)
    report: dict = {}
    prof = {r["variant"].split(":", 1)[1]: r for r in per_rank[0] if r["variant"].startswith("profile:")}
    if prof:
        base, jm = prof["backbone"], prof["jtokm_sharded_overlap"]
        added = {op: (jm["ops"].get(op, 0.0) - base["ops"].get(op, 0.0)) / jm["steps"]
                 for op in set(base["ops"]) | set(jm["ops"])}
        report["profile_added_s_per_step"] = dict(sorted(added.items(), key=lambda kv: -kv[1])[: args.profile_top])
        report["profile_total_s_per_step"] = {"backbone": sum(base["ops"].values()) / base["steps"],
                                              "jtokm_sharded_overlap": sum(jm["ops"].values()) / jm["steps"]}
    for variant in VARIANTS:
        recs = [r for rank_res in per_rank for r in rank_res if r["variant"] == variant]
        entry = {
            "median_step_s": statistics.median([t for r in recs for t in r["step_time_s"]]),
            "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in recs),
            "rss_growth_mb_per_rank": statistics.median([r["rss_growth_mb"] for r in recs]),
        }
        for key in EXCHANGE_KEYS:
            vals = [r[key] for r in recs if key in r]
            if vals:
                entry[key.split("/")[1]] = statistics.median(vals)
        if "rows_remote" in entry:
            # the floor: every unique id of a rank's micro-batch whose row lives on another rank travels once —
            # its id (8 B) to the owner, its row back, its gradient to the owner. Owners are a seeded random
            # permutation in blocks, so (W-1)/W of the unique ids are remote in expectation.
            w = args.ranks
            floor_rows = entry["unique_ids"] * (w - 1) / w
            entry["floor_rows_remote"] = floor_rows
            entry["floor_bytes_sent"] = floor_rows * (8 + 2 * recs[0]["row_bytes"])
        report[variant] = entry
    base = report["backbone"]["median_step_s"]
    for variant in VARIANTS:
        report[variant]["ratio_vs_backbone"] = report[variant]["median_step_s"] / base
    return report


def _decode_section(args) -> dict | None:
    try:
        from benchmarks.decode_bench import measure_decode
    except ImportError as e:  # decode benchmark not present in this checkout
        print(f"decode: skipped ({e})", file=sys.stderr)
        return None
    return measure_decode(CONFIGS[args.config], new_tokens=args.decode_tokens, repeats=args.decode_repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--profile-top", type=int, default=12, help="ops in the per-op profile of what JTok-M adds (0: off)")
    ap.add_argument("--work", default="/tmp/jtok_system_bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "system.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()

    train = _training_section(args)
    decode = None if args.skip_decode else _decode_section(args)
    report = {"config": args.config, "ranks": args.ranks, "steps": args.steps, "repeats": args.repeats,
              "date": time.strftime("%Y-%m-%d"), "wall_s": None, "training": train, "decode": decode}

    on, off, nd = train["jtokm_sharded_overlap"], train["jtokm_sharded"], train["jtokm_sharded_no_dedup"]
    report["summary"] = {
        "bytes_over_floor": on["bytes_sent"] / on["floor_bytes_sent"],
        "rows_over_floor": on["rows_remote"] / on["floor_rows_remote"],
        "bytes_dedup_over_no_dedup": on["bytes_sent"] / nd["bytes_sent"],
        "unique_over_positions": on["unique_ids"] / on["positions"],
        "exposed_wait_with_overlap_s": on["wait_s"],
        "wait_without_overlap_s": off["wait_s"],
        "exposed_fraction": on["wait_s"] / off["wait_s"] if off["wait_s"] else None,
    }
    report["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"\nconfig {args.config}, {args.ranks} gloo ranks, {args.steps} steps x {args.repeats} repeats "
          f"(medians), wall {report['wall_s']:.0f} s\n")
    print("| variant | step (s) | vs backbone | exchange MB sent/rank/step | compute waited (ms) | peak RSS/rank (MB) "
          "| RSS growth/rank (MB) |")
    print("|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        e = train[variant]
        sent = e.get("bytes_sent")
        wait = e.get("wait_s")
        print(f"| {variant} | {e['median_step_s']:.3f} | {e['ratio_vs_backbone']:.3f} | "
              f"{'-' if sent is None else f'{sent / 1e6:.2f}'} | {'-' if wait is None else f'{wait * 1e3:.2f}'} | "
              f"{e['peak_rss_mb_per_rank']:.0f} | {e['rss_growth_mb_per_rank']:.0f} |")
    if "profile_added_s_per_step" in train:
        tot = train["profile_total_s_per_step"]
        print(f"\nwhat JTok-M sharded + overlap adds per step, by op (self CPU time, rank 0, torch profiler; total "
              f"{tot['backbone'] * 1e3:.1f} ms backbone -> {tot['jtokm_sharded_overlap'] * 1e3:.1f} ms):\n")
        print("| op | added ms/step |\n|---|---|")
        for op, sec in train["profile_added_s_per_step"].items():
            print(f"| `{op}` | {sec * 1e3:+.2f} |")
    s = report["summary"]
    print(f"\nexchange bytes / unique-row floor: {s['bytes_over_floor']:.3f}; with dedup / without: "
          f"{s['bytes_dedup_over_no_dedup']:.3f} (unique/total ids {s['unique_over_positions']:.3f}); "
          f"exposed wait with overlap: {s['exposed_wait_with_overlap_s'] * 1e3:.2f} ms of "
          f"{s['wait_without_overlap_s'] * 1e3:.2f} ms")
    if decode:
        host = decode["jtokm_host"]
        print(f"decode ({decode['batch']} x {decode['new_tokens']} new tokens, KV cache, median of "
              f"{decode['repeats']}): backbone {decode['backbone']['decode_tokens_per_s']:.1f} tok/s, + JTok-M "
              f"tables in host memory {host['decode_tokens_per_s']:.1f} tok/s "
              f"({decode['ratios']['jtokm_host/backbone'] - 1:+.1%}), tables on device "
              f"{decode['jtokm_device']['decode_tokens_per_s']:.1f} tok/s "
              f"({decode['ratios']['jtokm_device/backbone'] - 1:+.1%}); table bytes to the device per token: "
              f"{host['table_bytes_per_decoded_token']:,} ({host['rows_per_token']})")


if __name__ == "__main__":
    main()
