"""The sbatch path on a real SLURM cluster: a single-node cluster on localhost (Debian's slurm-wlm and munge,
installed by launch/slurm/local_cluster.sh when missing), the project's own sbatch script (through submit.sh)
running torchrun with 2 gloo ranks on CPU, requeued twice part way:

1. `scontrol requeue` (what an admin or preemption does): SLURM sends SIGTERM to the job; the ranks checkpoint
   and stop; SLURM restarts the script (SLURM_RESTART_COUNT=1).
2. SIGUSR1 to the batch script (what `--signal=B:USR1@300` does before the time limit): the script asks the
   ranks to checkpoint and stop, then requeues the job itself (SLURM_RESTART_COUNT=2).

Each start resumes from <run_dir>/checkpoints/latest, and the job finishes all its steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "slurm" / "local_cluster.sh"

pytestmark = [pytest.mark.slow]


def _can_run() -> str | None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None if os.geteuid() == 0 else "the localhost SLURM daemons run as root"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge missing and not installable (needs root and apt-get)"
    return None


@pytest.fixture()
def slurm(tmp_path):
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    d = tmp_path / "slurm"
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120)
        pytest.fail(f"local SLURM cluster did not start:\n{proc.stdout}\n{proc.stderr}")
    # the job runs the interpreter these tests run under (not whichever .venv the checkout has)
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               JTOK_PYTHON=os.environ.get("JTOK_PYTHON", sys.executable))
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120, env=env)


def _job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def _wait(cond, timeout: float, what: str, log: Path, env=None) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            diag = ""
            if env is not None:
                diag = subprocess.run(["scontrol", "show", "job"], capture_output=True, text=True, env=env).stdout
                ctl = Path(env["SLURM_CONF"]).parent / "log" / "slurmctld.log"
                diag += "\n" + (ctl.read_text()[-2000:] if ctl.exists() else "")
            raise AssertionError(f"timed out waiting for {what}; job log:\n"
                                 + (log.read_text()[-4000:] if log.exists() else "(none)") + "\n" + diag)
        if log.exists() and "(signal: none)" in log.read_text() and "the job to end" not in what:
            raise AssertionError(f"training failed while waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _latest_step(run: Path) -> int:
    f = run / "checkpoints" / "latest"
    try:
        return int(f.read_text().strip().split("_")[-1])
    except (OSError, ValueError):
        return -1


def test_sbatch_requeue_resume_finishes(slurm, small_dataset, tmp_path):
    env = slurm
    run, log = tmp_path / "run", tmp_path / "job.out"
    steps = 30
    overrides = tiny_overrides(small_dataset, str(run), **{
        "train.train_iters": steps, "train.save": "true", "train.save_interval": 3, "logging.wandb": "true"})
    sub = subprocess.run(
        ["bash", "launch/slurm/submit.sh", "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
         "--cpus-per-task", "2", "--time", "00:15:00", "--job-name", "jtoktest", "--output", str(log), "--",
         *overrides],
        capture_output=True, text=True, timeout=60, env=dict(env, JTOK_SBATCH_DIR=str(tmp_path)), cwd=ROOT)
    assert sub.returncode == 0, sub.stderr
    job = re.search(r"Submitted batch job (\d+)", sub.stdout).group(1)

    # 1) scontrol requeue once a checkpoint exists
    _wait(lambda: _latest_step(run) >= 3, 240, "the first checkpoint", log, env)
    first_stop = _latest_step(run)
    assert subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True).returncode == 0
    _wait(lambda: "start 1 " in log.read_text(), 240, "the requeued start", log, env)

    # 2) the time-limit warning: SIGUSR1 to the batch script only, which checkpoints and requeues itself
    _wait(lambda: "resumed from" in log.read_text() and _latest_step(run) > first_stop, 300,
          "training to resume and checkpoint again", log, env)
    assert subprocess.run(["scancel", "-b", "--signal=USR1", job], env=env, capture_output=True).returncode == 0
    _wait(lambda: "start 2 " in log.read_text(), 240, "the start after the script's own requeue", log, env)

    _wait(lambda: _job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600,
          "the job to end", log, env)
    text = log.read_text()
    assert _job_field(env, job, "JobState") == "COMPLETED", text[-4000:]
    assert _job_field(env, job, "Restarts") == "2", text[-4000:]
    assert "requeueing job" in text                      # the script's own requeue after SIGUSR1
    assert text.count("resumed from") >= 2, text[-4000:]
    assert f"done: {steps} steps" in text or f"step {steps}" in text, text[-4000:]

    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    done = {r["step"] for r in rows if "loss" in r}
    assert done >= set(range(1, steps + 1)), sorted(set(range(1, steps + 1)) - done)
    assert _latest_step(run) == steps
    # composed once per start of the job; the same W&B run id across starts
    assert (run / "command.txt").read_text().count("restart=") == 3
    from jtok_train.training.metrics import read_wandb_history

    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and len({p.name.rsplit("-", 1)[-1] for p in runs}) == 1
    run_id, hist = read_wandb_history(run / "wandb")
    assert run_id == (run / "wandb_run_id").read_text().strip()
    assert max(r["_step"] for r in hist if "loss" in r) == steps
