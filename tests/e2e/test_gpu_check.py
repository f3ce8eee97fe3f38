"""The prepared GPU check's bootstrap and dry run, on a stand-in for the GPU machine as it comes: a Python 3.12 venv
holding only what the GPU image holds (benchmarks/gpu/image_venv.sh: torch, Triton, numpy, transformers,
tokenizers, safetensors, pyarrow, pytest; kept in the user's cache), the wheels of benchmarks/gpu/wheels.txt
(benchmarks/gpu/prepare.sh --wheels-only), and `check.sh --dry-run`, which installs them into a temporary target
with `pip --no-index --no-deps` and puts the repository on the path, as on the GPU machine. Every step runs on CPU
at toy size. A wheel missing from the list fails here (an ImportError in a step), not on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_bare_gpu_image(small_dataset, tmp_path):
    run = dict(cwd=ROOT, capture_output=True, text=True)
    venv = subprocess.run(["bash", "benchmarks/gpu/image_venv.sh"], timeout=1200, **run)
    assert venv.returncode == 0, venv.stdout[-2000:] + venv.stderr[-3000:]
    py = str(Path(venv.stdout.strip().splitlines()[-1]) / "bin" / "python")
    bare = subprocess.run([py, "-c", "import importlib.util as u, sys; import torch, triton, numpy, transformers; "
                           "sys.exit(any(u.find_spec(m) for m in ('megatron', 'hydra', 'omegaconf', 'jtok_train')))"],
                          timeout=300, **{**run, "cwd": tmp_path})
    assert bare.returncode == 0, "the image stand-in is not bare: " + bare.stderr[-2000:]
    prep = subprocess.run(["bash", "benchmarks/gpu/prepare.sh", "--wheels-only"], timeout=600, **run)
    assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-3000:]   # includes the 64 MiB limit
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(["bash", "benchmarks/gpu/check.sh", "--dry-run", "--out", str(tmp_path / "out"), "--data",
                           small_dataset["prefix"], small_dataset["tokenizer"]],
                          env={**env, "PYTHON": py}, timeout=1200, **run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    info, steps = summary["info"], summary["steps"]
    assert info["dry_run"] is True and summary["complete"] is True
    assert info["python"].startswith("3.12.") and info["megatron-core"] == "0.19.2"
    assert len(info["carried_wheels"]) == len([x for x in (ROOT / "benchmarks/gpu/wheels.txt").read_text().splitlines()
                                               if x.split("#")[0].strip()])
    assert set(steps) == {"kernels", "sanitizer", "overlap_bitwise", "te_vs_local", "step_time", "decode"}
    assert all(s["ok"] for s in steps.values()), {k: s for k, s in steps.items() if not s["ok"]}
    assert steps["te_vs_local"]["available"] is False   # not in the GPU image: reported, not failed
    assert steps["overlap_bitwise"]["tensors_compared"] > 20 and steps["overlap_bitwise"]["bitwise_equal"]
    assert steps["step_time"]["jtokm_vs_backbone"] > 0 and steps["decode"]["result"]
    assert set(info["one_gpu"]) == {"ranks", "exercised", "left_for_several_gpus"}
