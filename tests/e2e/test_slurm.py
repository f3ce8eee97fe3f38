"""The sbatch path on a real SLURM cluster of two nodes on this machine: launch/slurm/local_cluster.sh makes each
node a network namespace with its own address, hostname and slurmd (Debian's slurm-wlm and munge, installed
when missing); the project's own sbatch script (through submit.sh) trains the tiny MoE + JTok-M with sharded
tables over 2 nodes x 1 gloo rank, so the token-row exchange crosses nodes.

Every run is compared with a 2-rank run on one node without SLURM (the reference), by every tensor of the final
checkpoint (weights, table rows, optimizer moments) and every step's loss, bitwise: gloo's sums over two ranks
do not depend on where the ranks run, and each resume restores the exact state.

1. torchrun launcher on 2 nodes: `scontrol requeue` (SIGTERM to the job: the ranks checkpoint and stop; SLURM
   restarts the script), then SIGUSR1 to the batch script (the time-limit warning: the script has the ranks
   checkpoint and requeues the job itself); the job finishes on its third start.
2. The ranks of node 2 killed (SIGKILL) mid-run: the job fails with a line naming the last checkpoint; `scontrol
   requeue` resumes it on 2 nodes; cancelled (checkpoint on SIGTERM) and submitted again on 1 node x 2 ranks from
   the same run directory, it finishes there.
3. LAUNCHER=srun (one task per rank, no torchrun) on 2 nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jtok_train.testing.runs import assert_same_run, logged_losses
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "slurm" / "local_cluster.sh"
STEPS = 14

pytestmark = [pytest.mark.slow]


def _can_run() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (network namespaces, the daemons run as root)"
    if not (shutil.which("slurmctld") and shutil.which("munged")) and not shutil.which("apt-get"):
        return "slurm-wlm/munge missing and not installable (needs apt-get)"
    return None


def _cluster_objects(tag: str) -> list[str]:
    """Namespaces and links of the cluster with this TAG that exist now."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [n for n in re.findall(r"^(\S+)", ns, re.M) if n.startswith(f"jtok{tag}-")] + \
        [l for l in re.findall(r"^\d+: ([^:@]+)", links, re.M) if l.startswith(f"jt{tag}")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _can_run()
    if reason:
        pytest.skip(reason)       # a failure under make test (jtok_train.testing.no_skips), unless allowed
    d = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(d), "--nodes", "2", "--owner-pid", str(os.getpid())],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120)
        pytest.fail(f"local SLURM cluster did not start:\n{proc.stdout}\n{proc.stderr}")
    tag = re.search(r"^TAG=(\d+)", (d / "cluster.env").read_text(), re.M).group(1)
    assert len(_cluster_objects(tag)) == 2 + 2 + 1       # 2 namespaces, 2 host-side veths, the bridge
    # the jobs run the interpreter these tests run under (not whichever .venv the checkout has)
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               JTOK_PYTHON=os.environ.get("JTOK_PYTHON", sys.executable))
    try:
        yield {"env": env, "dir": d, "tag": tag}
    finally:
        stop = subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, text=True, timeout=180,
                              env=env)
        assert stop.returncode == 0, stop.stderr
        assert _cluster_objects(tag) == [], "stop left namespaces or links behind"


def _net_objects() -> set[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return set(re.findall(r"^(\S+)", ns, re.M)) | set(re.findall(r"^\d+: ([^:@]+)", links, re.M))


def test_a_failed_start_leaves_nothing_behind(tmp_path):
    """slurmd fails on the nodes (a stand-in on PATH that answers `slurmd -C` and fails otherwise) after the
    bridge, the namespaces, munged and slurmctld exist: the start exits non-zero and takes all of it down."""
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    shim = tmp_path / "bin"
    shim.mkdir()
    # the real slurmd is looked up when the shim runs: on a fresh machine the script installs it first
    (shim / "slurmd").write_text(f'#!/bin/sh\nif [ "$1" = -C ]; then\n'
                                 f'  real=$(PATH="{os.environ["PATH"]}" command -v slurmd) && exec "$real" -C\n'
                                 'fi\necho "slurmd: refusing to start" >&2\nexit 1\n')
    (shim / "slurmd").chmod(0o755)
    d = tmp_path / "cluster"
    before = _net_objects()
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(d), "--nodes", "2"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}"))
    assert proc.returncode != 0 and "start failed; tearing down" in proc.stderr, proc.stderr
    assert "slurmd: refusing to start" in proc.stderr            # the fault was the one injected
    assert (d / "slurm.conf").exists()                          # it got as far as the daemons
    assert _net_objects() == before                             # no namespace, veth or bridge left
    assert not (d / "cluster.env").exists()                     # stop ran to its end
    for daemon in ("munged", "slurmctld"):
        assert not (d / f"{daemon}.pid").exists(), daemon
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(d) not in ps, [l for l in ps.splitlines() if str(d) in l]


def _overrides(data: dict, run: Path, **extra) -> list[str]:
    return tiny_overrides(data, str(run), **{
        "parallel.embedding": "sharded", "train.train_iters": STEPS, "train.save": "true",
        "train.save_interval": 2, "train.keep_last": 3, "train.warmup_fraction": 0.2, "logging.wandb": "false",
        **extra})


@pytest.fixture(scope="module")
def reference(small_dataset, tmp_path_factory) -> Path:
    """The same config on one node without SLURM: 2 ranks on 127.0.0.1."""
    from jtok_train.testing.distributed import free_port

    run = tmp_path_factory.mktemp("ref") / "run"
    run.mkdir()
    port = str(free_port())
    procs = []
    for r in range(2):
        e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", RANK=str(r), WORLD_SIZE="2",
                 LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "jtok_train", *_overrides(small_dataset, run)], cwd=ROOT,
                                      env=e, stdout=open(run.parent / f"rank{r}.log", "wb"), stderr=subprocess.STDOUT))
    assert [p.wait(timeout=900) for p in procs] == [0, 0], (run.parent / "rank0.log").read_text()[-3000:]
    return run


def _submit(env: dict, tmp_path: Path, log: Path, overrides: list[str], nodes: int, nproc: int,
            launcher: str = "torchrun") -> str:
    sub = subprocess.run(
        ["bash", "launch/slurm/submit.sh", "--nodes", str(nodes), "--gpus-per-node", "0", "--nproc-per-node",
         str(nproc), "--cpus-per-task", str(nproc), "--launcher", launcher, "--time", "00:20:00",
         "--job-name", "jtoktest", "--output", str(log), "--", *overrides],
        capture_output=True, text=True, timeout=60, env=dict(env, JTOK_SBATCH_DIR=str(tmp_path)), cwd=ROOT)
    assert sub.returncode == 0, sub.stderr
    return re.search(r"Submitted batch job (\d+)", sub.stdout).group(1)


def _job_field(env, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def _wait(cond, timeout: float, what: str, log: Path, env=None, failure_ok: bool = False) -> None:
    t0 = time.time()
    failed_before = log.read_text().count("training FAILED") if log.exists() else 0
    while not cond():
        if time.time() - t0 > timeout:
            diag = ""
            if env is not None:
                diag = subprocess.run(["scontrol", "show", "job"], capture_output=True, text=True, env=env).stdout
                ctl = Path(env["SLURM_CONF"]).parent / "log" / "slurmctld.log"
                diag += "\n" + (ctl.read_text()[-2000:] if ctl.exists() else "")
            raise AssertionError(f"timed out waiting for {what}; job log:\n"
                                 + (log.read_text()[-4000:] if log.exists() else "(none)") + "\n" + diag)
        if not failure_ok and log.exists() and log.read_text().count("training FAILED") > failed_before:
            raise AssertionError(f"training failed while waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _ended(env, job: str) -> bool:
    return _job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def _latest_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    except (OSError, ValueError):
        return -1


def _rank_pids(cluster: dict, node: str) -> list[int]:
    """The training ranks (not torchrun, not the batch script) running in a node's namespace."""
    ns = f"jtok{cluster['tag']}-{node}"
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    out = []
    for pid in map(int, pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"jtok_train" in cmd and b"--resolved" in cmd and b"torch.distributed.run" not in cmd:
            out.append(pid)
    return out


def _node_bytes(cluster: dict, i: int) -> int:
    """Bytes through node i's link (its host-side veth: received + sent)."""
    stats = Path(f"/sys/class/net/jt{cluster['tag']}{i}/statistics")
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_requeue_and_time_limit_resume_like_one_node(slurm, small_dataset, reference, tmp_path):
    env = slurm["env"]
    run, log = tmp_path / "run", tmp_path / "job.out"
    bytes_before = _node_bytes(slurm, 2)
    job = _submit(env, tmp_path, log, _overrides(small_dataset, run, **{"logging.wandb": "true"}), nodes=2, nproc=1)

    # 1) scontrol requeue once a checkpoint exists
    _wait(lambda: _latest_step(run) >= 2, 300, "the first checkpoint", log, env)
    first_stop = _latest_step(run)
    assert subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True).returncode == 0
    _wait(lambda: "start 1 " in log.read_text(), 300, "the requeued start", log, env)

    # 2) the time-limit warning: SIGUSR1 to the batch script only, which checkpoints and requeues itself
    _wait(lambda: "resumed from" in log.read_text() and _latest_step(run) > first_stop, 300,
          "training to resume and checkpoint again", log, env)
    assert subprocess.run(["scancel", "-b", "--signal=USR1", job], env=env, capture_output=True).returncode == 0
    _wait(lambda: "start 2 " in log.read_text(), 300, "the start after the script's own requeue", log, env)
    _wait(lambda: _ended(env, job), 600, "the job to end", log, env)

    text = log.read_text()
    assert _job_field(env, job, "JobState") == "COMPLETED", text[-4000:]
    assert _job_field(env, job, "Restarts") == "2", text[-4000:]
    assert "requeueing job" in text                      # the script's own requeue after SIGUSR1
    assert text.count("resumed from") >= 2, text[-4000:]
    # every start: one rank on each node, with the node's own address (rendezvous on node1)
    assert text.count("ranks: 2 on 2 host(s): node1 rank 0; node2 rank 1") == 3, text[-4000:]
    assert re.search(r"master node1:\d+", text), text[-2000:]
    # the table rows crossed nodes: the exchange sent bytes every step, and node 2's link carried at least that
    rows = _metrics(run)
    sent = [r["exchange/bytes_sent"] for r in rows if "exchange/bytes_sent" in r]
    assert len(sent) >= STEPS and min(sent) > 0
    assert _node_bytes(slurm, 2) - bytes_before >= sum(sent)
    assert_same_run(reference, run, STEPS)
    # composed once per start of the job; the same W&B run id across starts
    assert (run / "command.txt").read_text().count("restart=") == 3
    from jtok_train.training.metrics import read_wandb_history

    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and len({p.name.rsplit("-", 1)[-1] for p in runs}) == 1
    run_id, hist = read_wandb_history(run / "wandb")
    assert run_id == (run / "wandb_run_id").read_text().strip()
    assert max(r["_step"] for r in hist if "loss" in r) == STEPS


def test_node2_killed_then_requeued_then_resumed_on_one_node(slurm, small_dataset, reference, tmp_path):
    env = slurm["env"]
    run, log, log1 = tmp_path / "run", tmp_path / "job.out", tmp_path / "job1.out"
    overrides = _overrides(small_dataset, run)
    job = _submit(env, tmp_path, log, overrides, nodes=2, nproc=1)

    # 1) SIGKILL node 2's rank once a checkpoint exists and training has gone on past it
    _wait(lambda: _latest_step(run) >= 4, 300, "a checkpoint", log, env)
    ckpt = _latest_step(run)
    _wait(lambda: max((s for s, _ in logged_losses(run)), default=0) > ckpt, 120, "a step past it", log, env)
    victims = _rank_pids(slurm, "node2")
    assert len(victims) == 1 and _rank_pids(slurm, "node1"), (victims, _rank_pids(slurm, "node1"))
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: _ended(env, job), 300, "the job to fail", log, env, failure_ok=True)
    text = log.read_text()
    assert all(not Path(f"/proc/{pid}").exists() for pid in victims)
    assert _job_field(env, job, "JobState") == "FAILED", text[-4000:]
    assert re.search(r"node2: task 1: (Killed|Exited)", text), text[-3000:]      # srun names the node
    last = re.search(r"\[jtok\] training FAILED \(exit \d+\) on node\[1-2\]: .*last checkpoint: (step_\d+);"
                     rf" .*'scontrol requeue {job}' resumes from it", text)
    assert last, text[-3000:]
    assert _latest_step(run) < STEPS

    # 2) requeued: resumes from that checkpoint on the same 2 nodes
    assert subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True).returncode == 0
    _wait(lambda: f"resumed from {run / 'checkpoints' / last.group(1)}" in log.read_text(), 300,
          "the requeued job to resume", log, env)
    resumed = int(last.group(1).split("_")[-1])
    _wait(lambda: _latest_step(run) > resumed, 300, "a checkpoint after the resume", log, env)

    # 3) cancelled (SIGTERM: the ranks checkpoint), then the same run directory on 1 node x 2 ranks
    assert subprocess.run(["scancel", job], env=env, capture_output=True).returncode == 0
    _wait(lambda: _ended(env, job), 300, "the cancelled job to end", log, env)
    stopped = _latest_step(run)
    assert resumed < stopped < STEPS, (resumed, stopped)
    job1 = _submit(env, tmp_path, log1, overrides, nodes=1, nproc=2)
    _wait(lambda: _ended(env, job1), 600, "the 1-node job to end", log1, env)
    text1 = log1.read_text()
    assert _job_field(env, job1, "JobState") == "COMPLETED", text1[-4000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:07d}'}" in text1, text1[-3000:]
    assert re.search(r"ranks: 2 on 1 host\(s\): node\d ranks 0-1", text1), text1[-3000:]
    assert_same_run(reference, run, STEPS)


def test_srun_launcher_on_two_nodes(slurm, small_dataset, reference, tmp_path):
    env = slurm["env"]
    run, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(env, tmp_path, log, _overrides(small_dataset, run), nodes=2, nproc=1, launcher="srun")
    _wait(lambda: _ended(env, job), 600, "the job to end", log, env)
    text = log.read_text()
    assert _job_field(env, job, "JobState") == "COMPLETED", text[-4000:]
    assert "ranks: 2 on 2 host(s): node1 rank 0; node2 rank 1" in text, text[-3000:]
    assert_same_run(reference, run, STEPS)
