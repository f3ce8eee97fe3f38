"""The prepared GPU check's dry run (benchmarks/gpu/check.sh --dry-run): every step of the script runs on CPU at
toy size and reports, so the script a GPU session runs first does not rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run(small_dataset, tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--dry-run", "--out", str(tmp_path), "--data",
                           small_dataset["prefix"], small_dataset["tokenizer"]], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable},   # this interpreter (either CI venv)
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = summary["steps"]
    assert set(steps) == {"kernels", "sanitizer", "overlap_bitwise", "te_vs_local", "step_time", "decode"}
    assert all(s["ok"] for s in steps.values()), {k: s for k, s in steps.items() if not s["ok"]}
    assert steps["overlap_bitwise"]["tensors_compared"] > 20
    assert steps["step_time"]["jtokm_vs_backbone"] > 0 and steps["decode"]["result"]
    assert summary["info"]["dry_run"] is True
