"""Pipeline parallelism on 2 CPU ranks, side by side: PP 1 (the 2 ranks data-parallel) vs PP 2 (one stage per
rank) vs PP 2 with 3 interleaved virtual stages (the bench config's 6 layers: one per model chunk), MoE + JTok-M
with sharded tables, the same global batch; step time and rows exchanged per rank and step.

    .venv/bin/python benchmarks/pipeline_bench.py                   # bench config, 8 steps, 2 repeats
    .venv/bin/python benchmarks/pipeline_bench.py --steps 6 --repeats 1 --configs tiny

Needs the demo data (`make demo`). Variants run interleaved (A B A B ...); step times are medians over steps after
the first two and over ranks. Rows: each rank's own ExchangeStats (with PP a stage's table holds only its layers,
so a row is L/PP layers' worth of bytes). Results: a markdown table on stdout and benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.exchange_bench import interleaved_runs  # noqa: E402

VARIANTS = {"pp1_dp2": [], "pp2": ["parallel.pipeline_model_parallel_size=2"],
            "pp2_vpp3": ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=3"]}
COMMON = ["jtok=jtokm", "parallel.embedding=sharded"]


def _run(runs: list[tuple[str, str, list[str]]]) -> list[dict]:
    import torch.distributed as dist

    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer

    out = []
    for config, variant, overrides in runs:
        tr = build_trainer(compose(overrides))
        history: list[dict] = []      # per step: the exchange counters of every model chunk's table, added
        pending: list[dict] = []
        for table, _ in tr.module.own_tables:
            def logged(pop=table.pop_stats):
                stats = pop()
                pending.append(stats)
                if len(pending) == len(tr.module.own_tables):
                    history.append({k: sum(p[k] for p in pending) for k in pending[0]})
                    pending.clear()
                return stats
            table.pop_stats = logged
        tr.fit()
        rows = [json.loads(x) for x in (Path(tr.run_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step_time_s"] for r in rows if "step_time_s" in r][2:]
        out.append({"config": config, "variant": variant, "step_time_s": steps,
                    "rows_requested": statistics.median(h["exchange/rows_requested"] for h in history),
                    "bytes_sent": statistics.median(h["exchange/bytes_sent"] for h in history),
                    "row_layers": tr.module.table.num_layers})   # a chunk's (all chunks hold as many)
        dist.barrier()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["bench"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    args = ap.parse_args()

    from jtok_train.testing import run_distributed

    runs = interleaved_runs(args.configs, {v: COMMON + ov for v, ov in VARIANTS.items()}, args.repeats, args.steps,
                            tag="pp_")
    per_rank = run_distributed(_run, 2, runs, timeout=3600)
    agg: dict[tuple[str, str], dict] = {}
    for rank_res in per_rank:
        for rec in rank_res:
            a = agg.setdefault((rec["config"], rec["variant"]), {"steps": [], "rows": [], "bytes": [], "layers": set()})
            a["steps"] += rec["step_time_s"]
            a["rows"].append(rec["rows_requested"])
            a["bytes"].append(rec["bytes_sent"])
            a["layers"].add(rec["row_layers"])
    report, lines = {}, ["| config | variant | median step (s) | vs PP 1 | rows requested / rank / step | "
                         "layers per row | exchange MiB sent / rank / step | vs PP 1 |", "|---|---|---|---|---|---|---|---|"]
    for config in args.configs:
        base = agg[(config, "pp1_dp2")]
        b_step, b_bytes = statistics.median(base["steps"]), statistics.median(base["bytes"])
        for variant in VARIANTS:
            a = agg[(config, variant)]
            step, rows, nbytes = statistics.median(a["steps"]), statistics.median(a["rows"]), statistics.median(a["bytes"])
            report[f"{config}/{variant}"] = {"median_step_s": step, "step_vs_pp1": step / b_step,
                                             "rows_requested_per_step": rows, "layers_per_row": sorted(a["layers"]),
                                             "bytes_sent_per_step": nbytes, "bytes_vs_pp1": nbytes / b_bytes}
            lines.append(f"| {config} | {variant} | {step:.3f} | {step / b_step:.3f} | {rows:,.0f} | "
                         f"{'/'.join(map(str, sorted(a['layers'])))} | {nbytes / 2**20:.2f} | {nbytes / b_bytes:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
