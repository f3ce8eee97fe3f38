"""Step time and memory per rank of the production settings, side by side on 2 CPU ranks: Megatron's DDP optimizer
vs the distributed optimizer, and activation recompute none / selective / full (bf16, MoE + JTok-M, sharded tables).

    .venv/bin/python benchmarks/production_bench.py                   # bench config, 8 steps, 2 repeats
    .venv/bin/python benchmarks/production_bench.py --steps 6 --repeats 1 --configs tiny

Needs the demo data (`make demo`, or `jtok-data build --source python-docs --out data/demo`). Variants run
interleaved (A B C D E A B C D E ...); step times are medians over steps after the first two and over ranks.
Memory per rank, from the live tensors (the planner's units, tests/distributed/test_planner_measured.py):
Megatron's optimizer states, and the activations one training micro-batch saves for its backward (the process's
RSS is no per-variant figure: the variants run one after another in the same 2 processes, and its peak only
grows). Results: a markdown table on stdout and benchmarks/results/production.json.
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

VARIANTS = {
    "ddp": [],
    "distopt": ["parallel.use_distributed_optimizer=true"],
    "recompute_selective": ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,layernorm]"],
    "recompute_full_uniform1": ["model.recompute_granularity=full", "model.recompute_method=uniform",
                                "model.recompute_num_layers=1"],
    "distopt_recompute_full": ["parallel.use_distributed_optimizer=true", "model.recompute_granularity=full",
                               "model.recompute_method=uniform", "model.recompute_num_layers=1"],
}
COMMON = ["jtok=jtokm", "parallel.embedding=sharded", "train.precision=bf16"]


def _run(runs: list[tuple[str, str, list[str]]]) -> list[dict]:
    from tests.distributed.test_planner_measured import _measure

    out = []
    for config, variant, overrides in runs:
        mem = _measure([overrides])[0]
        run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.run_dir="))
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step_time_s"] for r in rows if "step_time_s" in r][2:]
        out.append({"config": config, "variant": variant, "step_time_s": steps, "optimizer": mem["optimizer"],
                    "activations": mem["activations"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["bench"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "production.json"))
    args = ap.parse_args()

    from jtok_train.testing import run_distributed

    runs = interleaved_runs(args.configs, {v: COMMON + ov for v, ov in VARIANTS.items()}, args.repeats, args.steps,
                            tag="prod_")
    per_rank = run_distributed(_run, 2, runs, timeout=3600)
    agg: dict[tuple[str, str], dict] = {}
    for rank_res in per_rank:
        for rec in rank_res:
            a = agg.setdefault((rec["config"], rec["variant"]), {"steps": [], "opt": [], "act": []})
            a["steps"] += rec["step_time_s"]
            a["opt"].append(rec["optimizer"])
            a["act"].append(rec["activations"])
    report, lines = {}, ["| config | variant | median step (s) | vs ddp | optimizer MiB/rank | vs ddp | "
                         "activations MiB/rank | vs ddp |", "|---|---|---|---|---|---|---|---|"]
    for config in args.configs:
        base = agg[(config, "ddp")]
        b_step, b_opt, b_act = (statistics.median(base["steps"]), statistics.median(base["opt"]),
                                statistics.median(base["act"]))
        for variant in VARIANTS:
            a = agg[(config, variant)]
            step, opt, act = statistics.median(a["steps"]), statistics.median(a["opt"]), statistics.median(a["act"])
            report[f"{config}/{variant}"] = {"median_step_s": step, "step_vs_ddp": step / b_step,
                                             "optimizer_bytes": opt, "optimizer_vs_ddp": opt / b_opt,
                                             "activation_bytes": act, "activations_vs_ddp": act / b_act}
            lines.append(f"| {config} | {variant} | {step:.3f} | {step / b_step:.3f} | {opt / 2**20:.2f} | "
                         f"{opt / b_opt:.3f} | {act / 2**20:.2f} | {act / b_act:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
