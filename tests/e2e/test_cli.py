"""The real command lines: torchrun with 2 gloo ranks, a single process, bad overrides, the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _torchrun(n: int) -> list[str]:
    from jtok_train.testing.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(free_port())]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_ranks_jtokm_trains_evaluates_and_saves(small_dataset, tmp_path):
    run = tmp_path / "run"
    peak = 0.05      # TFLOP/s per rank, given: on CPU there is no MFU without one
    args = tiny_overrides(small_dataset, str(run), **{"train.train_iters": 20, "train.save": "true",
                                                      "train.lr": 3e-3, "train.progress": "true",
                                                      "train.peak_tflops": peak})
    proc = subprocess.run(_torchrun(2) + ["-m", "jtok_train", *args], capture_output=True, text=True,
                          timeout=600, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 20 steps" in proc.stdout and "tokens/s" in proc.stdout
    rows = _metrics(run)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.5, (first, last)
    # MFU = training FLOPs per token x tokens/s over the world's peak, the record naming that peak
    from jtok_train.config import compose
    from jtok_train.planning.formulas import flops_per_token, formula_params

    cfg = compose(args)
    fpt = flops_per_token(cfg, formula_params(cfg))
    assert all(r["tokens_per_s"] > 0 and r["mfu_peak_tflops"] == peak for r in train)
    assert [r["mfu"] for r in train] == pytest.approx([fpt * r["tokens_per_s"] / (2 * peak * 1e12) for r in train],
                                                      rel=1e-12)
    assert "MFU " in proc.stderr and f"% of {peak:g} TFLOP/s" in proc.stderr      # the bar names the peak
    assert "aux/jtokm_load_balancing_loss" in train[0] and "jtokm/load_imbalance_mean" in train[0]
    assert any("valid_loss" in r for r in rows)
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000020"
    assert any((ckpt / "step_0000020").iterdir())
    assert (run / ".hydra" / "config.yaml").is_file()   # Hydra saved the composed config
    assert "train:" in proc.stderr or "it/s" in proc.stderr or "step" in proc.stderr  # the progress bar


def test_single_process_backbone_alone(small_dataset, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(small_dataset, str(run), jtok="none", **{"train.train_iters": 4})
    proc = subprocess.run([sys.executable, "-m", "jtok_train", *args], capture_output=True, text=True,
                          timeout=600, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in _metrics(run) if "loss" in r]
    assert len(rows) == 4 and not any(k.startswith("jtokm/") for k in rows[0])
    # CPU without train.peak_tflops: no MFU at all (no nominal CPU peak)
    assert not any(k.startswith("mfu") for r in rows for k in r), rows[0]


def test_bad_override_names_the_key(small_dataset, tmp_path):
    args = tiny_overrides(small_dataset, str(tmp_path / "r"), **{"jtok.top_k": 7})
    proc = subprocess.run([sys.executable, "-m", "jtok_train", *args], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 2
    assert "jtok.top_k=7" in proc.stderr
    small_vocab = tiny_overrides(small_dataset, str(tmp_path / "r2"), **{"model.vocab_size": 100})
    proc = subprocess.run([sys.executable, "-m", "jtok_train", *small_vocab], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 2 and "model.vocab_size=100" in proc.stderr
    missing = tiny_overrides(small_dataset, str(tmp_path / "r3"), **{"data.prefixes": f"[{tmp_path}/nothing_here]"})
    proc = subprocess.run([sys.executable, "-m", "jtok_train", *missing], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "nothing_here" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/doc/python3.11/html/_sources").is_dir(), reason="needs python3.11-doc")
def test_demo_script_loss_goes_down(tmp_path):
    """The README's demo command, shortened to 40 steps."""
    run = tmp_path / "demo"
    proc = subprocess.run(["bash", "launch/demo.sh", "train.train_iters=40", f"train.run_dir={run}",
                           "train.progress=false"], capture_output=True, text=True, timeout=1500, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in _metrics(run) if "loss" in r]
    assert len(train) == 40 and train[-1]["loss"] < train[0]["loss"] - 1.0
    assert "validation loss" in proc.stdout or any("valid_loss" in r for r in _metrics(run))
    # the demo checkpoint generates from the CLI (greedy, KV cache, JTok-M tables in host memory)
    prompt = "The for statement"
    gen = subprocess.run([sys.executable, "-m", "jtok_train.cli.generate", f"checkpoint={run}", f"prompt={prompt}",
                          "max_new_tokens=24", "stats=true"], capture_output=True, text=True, timeout=600, env=ENV,
                         cwd=ROOT)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith(prompt) and len(gen.stdout.strip()) > len(prompt), gen.stdout
    assert "jtok=jtokm" in gen.stderr and "bytes of table rows per token" in gen.stderr
