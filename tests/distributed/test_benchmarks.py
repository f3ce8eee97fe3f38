"""The training-cost benchmarks measure what they say: the paired ratio pairs each repeat's runs and both ranks'
steps, and the table-path benchmark runs the real table and optimizer on 2 ranks (fused AdamW, deduplicated ids)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.exchange_bench import paired_ratios  # noqa: E402

pytestmark = pytest.mark.distributed


def test_paired_ratio_divides_each_repeat_by_the_backbone_run_of_the_same_repeat():
    def rec(steps):
        return {"step_time_s": steps}

    # two repeats; records of rank 0 in run order, then rank 1's (as the benchmark gathers them)
    results = {
        ("tiny", "backbone"): {"ranks": [rec([1.0, 1.0]), rec([2.0, 2.0]), rec([1.0, 1.0]), rec([2.0, 2.0])]},
        ("tiny", "v"): {"ranks": [rec([1.1, 1.3]), rec([2.0, 2.4]), rec([1.2, 1.2]), rec([2.2, 2.2])]},
    }
    got = paired_ratios(results, "tiny", "v")
    # repeat 1: median of both ranks' steps (1.1, 1.3, 1.2, 1.2) = 1.2 over 1.0; repeat 2 (a machine twice as
    # slow for both runs): 2.2 over 2.0, not over the backbone's median of all repeats
    assert got == pytest.approx([1.2, 1.1])


def test_table_path_bench_runs_the_table_and_its_optimizer_on_2_ranks(small_dataset, tmp_path):
    out = tmp_path / "table_path.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "table_path_bench.py"), "--data-prefix", small_dataset["prefix"],
         "--vocab", str(small_dataset["vocab_size"]), "--layers", "2", "--sets", "3", "--hidden", "16",
         "--micro-batch", "2", "--seq", "64", "--steps", "4", "--warmup", "1", "--profile", "--profile-steps", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["wall_s"] > 0 and rep["cpu_s"] > 0
    positions = 2 * 2 * 64   # micro-batches x micro-batch x sequence, per rank-step
    for rank in rep["ranks"]:
        # real text repeats ids: dedup leaves fewer unique ids than positions, and some remain
        assert 0 < rank["unique_ids_per_step"] < positions, rank
    # the dense table optimizer ran through torch's fused AdamW, once per profiled step, and the profile saw it
    # (by its calls: whether it is among the top ops by time depends on the machine's load)
    assert rep["ranks"][0]["profile_calls"].get("aten::_fused_adamw_") == 2, rep["ranks"][0]["profile_calls"]
    assert rep["ranks"][0]["profile_ms_per_step"]
    assert "table path per step (adamw)" in proc.stdout
