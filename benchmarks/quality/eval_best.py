"""demo_cloze accuracy of the quality study's best run of each variant (BENCHMARKS.md, "Downstream evaluation").

    .venv/bin/python benchmarks/quality/eval_best.py [--runs-dir runs/quality_eval]

Retrains each run with the study's own overrides (benchmarks/quality/study.py, grid()) plus train.save=true and
eval.tasks=[demo_cloze]: the in-loop evaluator scores all 250 items after the last step; prints the run, its
wall time and the accuracies logged in its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BEST = ("iso_b2_jtokm_d16_s1", "iso_b2_none_d16_s1", "iso_b2_jtok_d16_s1")   # lowest loss per variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", default="runs/quality_eval")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import study

    specs = {s["name"]: s for s in study.grid(Path(a.runs_dir), only="isoflop")}
    for name in BEST:
        s = specs[name]
        overrides = [o for o in s["overrides"] if not o.startswith("train.save=")]
        overrides += ["train.save=true", "eval.tasks=[demo_cloze]", "eval.batch_size=16"]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jtok_train", *overrides], check=True, cwd=ROOT, capture_output=True)
        rows = [json.loads(line) for line in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        scores = [r for r in rows if "eval/demo_cloze/acc" in r][-1]
        print(f"{name}: {s['steps']} steps, {time.perf_counter() - t0:.0f} s, acc {scores['eval/demo_cloze/acc']:.3f}, "
              f"acc_norm {scores['eval/demo_cloze/acc_norm']:.3f}", flush=True)


if __name__ == "__main__":
    main()
