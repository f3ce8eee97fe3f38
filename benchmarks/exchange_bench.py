"""Step time and exchange volume of JTok-M's embedding parallelism, measured side by side on CPU.

    .venv/bin/python benchmarks/exchange_bench.py                  # tiny + bench configs, 2 ranks
    .venv/bin/python benchmarks/exchange_bench.py --steps 8 --repeats 1 --configs tiny

Needs the demo data (`make demo`, or `jtok-data build --source python-docs --out data/demo`).
Every variant runs on 2 gloo ranks, in the order A B C D A B C D ... (repeats), each run in fresh
processes, and the figures are medians over steps after the first two. Fresh processes because runs that
share a process are not alike: every Trainer leaves its process groups (and their gloo threads) behind, and
later runs in one process measured backbone ops several times slower than the same ops in a process of
their own. Next to the ratio of medians: the per-repeat ratio (each repeat's variant run over its backbone run,
so that the drift of a shared machine between repeats cancels; median, min and max over the repeats) and the
CPU seconds per step (user + system of the rank's process: the work, without the waits on the other rank).
Results: a markdown table on stdout and a JSON file
(benchmarks/results/exchange.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "backbone": ["jtok=none"],
    "jtokm_replicated": ["jtok=jtokm", "parallel.embedding=replicated"],
    "jtokm_sharded_no_overlap": ["jtok=jtokm", "parallel.embedding=sharded", "parallel.overlap=false"],
    "jtokm_sharded_overlap": ["jtok=jtokm", "parallel.embedding=sharded", "parallel.overlap=true"],
    "jtokm_sharded_no_dedup": ["jtok=jtokm", "parallel.embedding=sharded", "parallel.dedup=false"],
    "jtokm_sharded_overlap_sparse": ["jtok=jtokm", "parallel.embedding=sharded", "jtok.table_optimizer=sparse_adamw"],
    # hot rows: the H most frequent ids of the data replicated (needs data/demo/text_document.counts.npy:
    # `jtok-data stats data/demo --count-ids`)
    **{f"jtokm_sharded_hot{h}": ["jtok=jtokm", "parallel.embedding=sharded", f"parallel.hot_rows={h}"]
       for h in (256, 1024, 4096)},
}
CONFIGS = {
    # the demo model: d 128, 4 layers, 8 experts; micro-batch 4 x 256 tokens
    "tiny": ["model=tiny"],
    # wider: d 256, 6 layers, 16 experts top-2, vocab 4096; micro-batch 4 x 256
    "bench": ["model=tiny", "model.hidden_size=256", "model.num_layers=6", "model.num_attention_heads=8",
              "model.num_experts=16", "model.moe_ffn_hidden_size=256", "model.moe_shared_expert_intermediate_size=256"],
}


def interleaved_runs(configs: list[str], variants: dict[str, list[str]], repeats: int, steps: int,
                     tag: str = "") -> list[tuple[str, str, list[str]]]:
    """(config, variant, overrides) for every config x repeat x variant, variants interleaved (A B C A B C ...)."""
    return [(config, variant, CONFIGS[config] + ov + [
        "data=demo", "train=demo", f"train.train_iters={steps}", "train.save=false", "train.progress=false",
        "logging.wandb=false", "train.eval_samples=8", f"train.run_dir=/tmp/jtok_bench/{tag}{config}_{variant}_{rep}"])
        for config in configs for rep in range(repeats) for variant, ov in variants.items()]


def fresh_process_runs(measure, ranks: int, runs: list) -> list[list]:
    """measure([run]) for every run in its own ``ranks`` fresh processes; per rank, the records of all runs."""
    from jtok_train.testing import run_distributed

    per_rank: list[list] = [[] for _ in range(ranks)]
    for run in runs:
        for rank, recs in enumerate(run_distributed(measure, ranks, [run], timeout=3600)):
            per_rank[rank] += recs
    return per_rank


def _count_cpu_time(module) -> list[float]:
    """The process's CPU seconds (user + system, all threads) of every ``module.train_step``: the work a step
    costs, which the wall time mixes with waits on the other rank."""
    import resource

    out: list[float] = []
    step = module.train_step

    def timed(*args, **kwargs):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        try:
            return step(*args, **kwargs)
        finally:
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            out.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)

    module.train_step = timed
    return out


def paired_ratios(results: dict, config: str, variant: str) -> list[float]:
    """Per repeat: the variant's median step over the backbone's median step of the same repeat (both ranks'
    steps), so that the drift of a shared machine between repeats cancels."""
    def run_medians(key):
        recs = results[key]["ranks"]
        half = len(recs) // 2   # rank 0's records in run order, then rank 1's
        return [statistics.median(a["step_time_s"] + b["step_time_s"]) for a, b in zip(recs[:half], recs[half:])]

    return [v / b for v, b in zip(run_medians((config, variant)), run_medians((config, "backbone")))]


def _measure(runs: list[tuple[str, str, list[str]]]) -> list[dict]:
    import torch.distributed as dist

    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer

    out = []
    for config, variant, overrides in runs:
        tr = build_trainer(compose(overrides))
        cpu = _count_cpu_time(tr.module)
        res = tr.fit()
        rows = [json.loads(l) for l in (Path(tr.run_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "step_time_s" in r][2:]
        rec = {"config": config, "variant": variant, "step_time_s": [r["step_time_s"] for r in steps],
               "cpu_s": cpu[2:], "loss": res.losses[-1]}
        for key in ("exchange/bytes_sent", "exchange/bytes_received", "exchange/wait_s", "exchange/positions",
                    "exchange/unique_ids", "exchange/rows_remote", "exchange/rows_requested", "exchange/hot_hits"):
            vals = [r[key] for r in steps if key in r]
            if vals:
                rec[key] = statistics.median(vals)
        out.append(rec)
        dist.barrier()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "exchange.json"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()

    runs = interleaved_runs(args.configs, {v: VARIANTS[v] for v in args.variants}, args.repeats, args.steps)
    per_rank = fresh_process_runs(_measure, 2, runs)
    results: dict[tuple[str, str], dict] = {}
    for rank_res in per_rank:
        for rec in rank_res:
            key = (rec["config"], rec["variant"])
            agg = results.setdefault(key, {"step_time_s": [], "ranks": []})
            agg["step_time_s"] += rec["step_time_s"]
            agg["ranks"].append(rec)

    report = {}
    lines = ["| config | variant | median step (s) | vs backbone | per-repeat ratio: median (min..max) | CPU s / step "
             "vs backbone | exch. bytes sent/rank/step | wait (s) | remote rows "
             "/ token | served locally (hot) / unique |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config in args.configs:
        base = statistics.median(results[(config, "backbone")]["step_time_s"])
        base_cpu = statistics.median([c for r in results[(config, "backbone")]["ranks"] for c in r["cpu_s"]])
        for variant in args.variants:
            agg = results[(config, variant)]
            med = statistics.median(agg["step_time_s"])
            sent = statistics.median([r.get("exchange/bytes_sent", 0) for r in agg["ranks"]])
            wait = statistics.median([r.get("exchange/wait_s", 0) for r in agg["ranks"]])
            paired = paired_ratios(results, config, variant)
            cpu = statistics.median([c for r in agg["ranks"] for c in r["cpu_s"]])
            entry = {"median_step_s": med, "ratio_vs_backbone": med / base, "bytes_sent": sent, "wait_s": wait,
                     "paired_ratios": paired, "paired_ratio_median": statistics.median(paired),
                     "median_cpu_s": cpu, "cpu_ratio_vs_backbone": cpu / base_cpu,
                     # the spread: each run's (repeat's) median on rank 0, in run order
                     "run_medians_s": [statistics.median(r["step_time_s"]) for r in agg["ranks"][: len(agg["ranks"]) // 2]]}
            for k in ("exchange/positions", "exchange/unique_ids", "exchange/rows_remote", "exchange/hot_hits"):
                vals = [r[k] for r in agg["ranks"] if k in r]
                if vals:
                    entry[k] = statistics.median(vals)
            report[f"{config}/{variant}"] = entry
            pos = entry.get("exchange/positions")
            remote = f"{entry['exchange/rows_remote'] / pos:.3f}" if pos and "exchange/rows_remote" in entry else "-"
            hot = (f"{entry.get('exchange/hot_hits', 0) / entry['exchange/unique_ids']:.3f}"
                   if entry.get("exchange/unique_ids") else "-")
            lines.append(f"| {config} | {variant} | {med:.3f} | {med / base:.3f} | {statistics.median(paired):.3f} "
                         f"({min(paired):.3f}..{max(paired):.3f}) | {cpu / base_cpu:.3f} | {sent / 1e6:.2f} MB | {wait:.3f} | "
                         f"{remote} | {hot} |")
        if not all(f"{config}/{v}" in report for v in ("jtokm_sharded_overlap", "jtokm_sharded_no_overlap",
                                                        "jtokm_sharded_no_dedup")):
            continue
        on, off = report[f"{config}/jtokm_sharded_overlap"], report[f"{config}/jtokm_sharded_no_overlap"]
        nd = report[f"{config}/jtokm_sharded_no_dedup"]
        report[f"{config}/summary"] = {
            "exposed_fraction_with_overlap": on["wait_s"] / off["wait_s"] if off["wait_s"] else None,
            "bytes_dedup_over_no_dedup": on["bytes_sent"] / nd["bytes_sent"] if nd["bytes_sent"] else None,
            "unique_over_positions": on.get("exchange/unique_ids", 0) / max(1, on.get("exchange/positions", 1)),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    for config in args.configs:
        if f"{config}/summary" in report:
            print(config, json.dumps(report[f"{config}/summary"]))


if __name__ == "__main__":
    main()
