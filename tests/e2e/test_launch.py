"""The Hydra app (overrides, --cfg job, the run directory's resolved config and command, bad overrides) and
launch/torchrun.sh with 2 gloo ranks, logging to W&B offline; a second launch resumes with the same W&B run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
# the launchers run the interpreter these tests run under (not whichever .venv the checkout has)
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
           JTOK_PYTHON=os.environ.get("JTOK_PYTHON", sys.executable))


def _app(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jtok_train", *args], capture_output=True, text=True, timeout=300,
                          env=ENV, cwd=ROOT, **kw)


def test_hydra_app_cfg_job_prepare_and_bad_overrides(small_dataset, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(small_dataset, str(run), **{"model.hidden_size": 96, "train.lr": 2e-3})
    # --cfg job: the composed config with the CLI overrides, nothing written, nothing trained
    p = _app(*args, "--cfg", "job")
    assert p.returncode == 0, p.stderr
    shown = yaml.safe_load(p.stdout)
    assert shown["model"]["hidden_size"] == 96 and shown["train"]["lr"] == 2e-3 and shown["jtok"]["variant"] == "jtokm"
    assert not run.exists()
    # --prepare: compose + validate once, write the run directory's files, print launch.env
    p = subprocess.run([sys.executable, "-m", "jtok_train", "--prepare", *args], capture_output=True, text=True,
                       timeout=300, env=dict(ENV, JTOK_WORLD_SIZE="2"), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    env_file = Path(p.stdout.strip().splitlines()[-1])
    assert env_file == (run / "launch.env").resolve()
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert Path(env["JTOK_RESOLVED_CONFIG"]) == (run / "config.yaml").resolve()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "hydra" not in saved and saved["model"]["hidden_size"] == 96
    assert saved["data"]["prefixes"] == [small_dataset["prefix"]]
    assert (run / ".hydra" / "overrides.yaml").is_file()
    cmd = (run / "command.txt").read_text()
    assert "model.hidden_size=96" in cmd and "-m jtok_train --prepare" in cmd
    from jtok_train.cli.train import load_resolved
    from jtok_train.config import compose, resolved

    assert resolved(load_resolved(run / "config.yaml")) == resolved(compose(args))
    # a world size the batch does not divide is caught before any rank starts
    p = subprocess.run([sys.executable, "-m", "jtok_train", "--prepare", *args], capture_output=True, text=True,
                       timeout=300, env=dict(ENV, JTOK_WORLD_SIZE="3"), cwd=ROOT)
    assert p.returncode == 2 and "train.global_batch_size=8" in p.stderr
    # bad overrides: an unknown key and a bad value (ours: one line naming the key, exit 2), a bad group (Hydra's
    # message, which lists the group's options)
    p = _app(*args, "model.hidden_sise=64")
    assert p.returncode == 2 and "unknown config key model.hidden_sise (did you mean model.hidden_size?)" in p.stderr
    p = _app(*args, "logging.wandb_mode=sometimes")
    assert p.returncode == 2 and "logging.wandb_mode='sometimes'" in p.stderr
    p = _app(*args, "model=nosuchmodel")
    assert p.returncode == 1 and "nosuchmodel" in p.stderr
    # --resolved refuses overrides: the config was composed already
    p = _app("--resolved", str(run / "config.yaml"), "train.lr=1")
    assert p.returncode != 0 and "takes no overrides" in p.stderr


def _torchrun_sh(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/torchrun.sh", "--nproc-per-node", "2", *args], capture_output=True,
                          text=True, timeout=900, env=ENV, cwd=ROOT)


def test_torchrun_launcher_two_ranks_wandb_offline_resume(small_dataset, tmp_path):
    from jtok_train.training.metrics import read_wandb_history

    run = tmp_path / "run"
    base = tiny_overrides(small_dataset, str(run), **{"logging.wandb": "true", "train.save": "true",
                                                      "train.progress": "true"})
    p = _torchrun_sh(base + ["train.train_iters=4"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "done: 4 steps" in p.stdout
    assert "train:" in p.stderr                                   # the progress bar (tqdm writes to stderr)
    assert (run / "config.yaml").is_file() and (run / "launch.env").is_file()
    assert (run / "command.txt").read_text().count("launch/torchrun.sh --nproc-per-node 2") == 1
    # W&B offline: the run lives in the run directory, and its history holds the step metrics
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (run / "wandb_run_id").read_text().strip()
    rid, hist = read_wandb_history(runs[0])
    assert rid == run_id
    train_rows = [r for r in hist if "loss" in r]
    assert [r["_step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem/rss_gib", "jtokm/load_imbalance_mean",
                "jtokm/load_imbalance_layer0", "aux/jtokm_load_balancing_loss", "moe/load_imbalance_layer0",
                "moe/load_imbalance_mean"):
        assert key in train_rows[-1], (key, sorted(train_rows[-1]))
    assert "mfu" not in train_rows[-1] and "MFU" not in p.stderr    # CPU, no train.peak_tflops: no MFU
    assert any("valid_loss" in r for r in hist)
    # metrics.jsonl agrees with W&B
    jl = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert [r["loss"] for r in jl] == pytest.approx([r["loss"] for r in train_rows])

    # second launch, more steps: resumes from the checkpoint and logs to the same W&B run
    p = _torchrun_sh(base + ["train.train_iters=6"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "done: 6 steps" in p.stdout
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)
    rid, hist = read_wandb_history(run / "wandb")
    assert rid == run_id
    assert [r["_step"] for r in hist if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (run / "command.txt").read_text().count("launch/torchrun.sh") == 2
