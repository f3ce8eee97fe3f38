"""Exact resume through the real command line (`python -m jtok_train`, one process per rank as srun starts
them): SIGKILL at a random step, SIGKILL in the middle of a save, SIGTERM (preemption: save, exit with the
requeue code). The resumed run ends with bitwise the same weights, tables, optimizer states and RNG states as an
uninterrupted run, and logs the same loss at every step.

The kill in a save and the SIGTERM tests start fresh interpreters (``python -m jtok_train``, the command line as
users start it); the 20 kills and the pipeline kills start the same command in processes forked from the
preloaded server (jtok_train.testing.commands: new processes, killed for real, without the imports)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jtok_train.testing.faults import FAULT_MARK, KILL_IN_SAVE
from jtok_train.training.signals import REQUEUE_EXIT_CODE
from jtok_train.testing.runs import assert_same_run, logged_losses
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _args(data: dict, run: Path, **extra) -> list[str]:
    return tiny_overrides(data, str(run), **{"logging.wandb": "false", "train.save": "true",
                                             "train.save_interval": 1, "train.keep_last": 2,
                                             "train.train_iters": STEPS, "train.warmup_fraction": 0.2, **extra})


def _launch(n: int, args: list[str], run: Path, env: dict | None = None, faults: dict | None = None,
            fresh: bool = False) -> list:
    """One process per rank, as srun starts them; ``faults`` (JTOK_FAULT_* variables): through the
    fault-injection entry point ``python -m jtok_train.testing.faults`` instead of ``python -m jtok_train``.
    ``fresh``: new interpreters (``subprocess``), for the tests that stand for the real command line; otherwise
    processes forked from the preloaded server (``jtok_train.testing.commands``: a new process per rank, killed
    for real, without the 8 s of imports)."""
    from jtok_train.testing.commands import start_command
    from jtok_train.testing.distributed import free_port

    port = str(free_port())
    run.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(n):
        e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", RANK=str(r), WORLD_SIZE=str(n),
                 LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                 **(env or {}), **(faults or {}))
        log = run.parent / f"{run.name}.rank{r}.log"
        entry = "jtok_train.testing.faults" if faults else "jtok_train"
        if fresh:
            with open(log, "ab") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", entry, *args], cwd=ROOT, env=e, stdout=out,
                                              stderr=subprocess.STDOUT))
        else:
            procs.append(start_command(entry, args, env=e, log=log, cwd=ROOT))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]


def _wait_for_step(run: Path, step: int, procs: list[subprocess.Popen], timeout: float = 600) -> None:
    """Until these processes log ``step`` (records an earlier, killed process left in metrics.jsonl do not count)."""
    deadline = time.monotonic() + timeout
    before = len(logged_losses(run))
    while time.monotonic() < deadline:
        if any(s >= step for s, _ in logged_losses(run)[before:]):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"run ended before step {step}: codes {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def _assert_same(ref_run: Path, run: Path) -> None:
    assert_same_run(ref_run, run, STEPS)


@pytest.fixture(scope="module")
def reference(small_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    assert _wait(_launch(1, _args(small_dataset, run), run)) == [0]
    return run


def test_sigkill_during_a_save_then_at_a_random_step_resumes_exactly(small_dataset, reference, tmp_path):
    run = tmp_path / "run"
    # 1) killed in the middle of saving step 3: the previous checkpoint stays complete and latest
    assert _wait(_launch(1, _args(small_dataset, run), run, faults={KILL_IN_SAVE: "3"}, fresh=True)) == [-9]
    assert f"{FAULT_MARK} after writing the torch_dist files of step_0000003.partial" in \
        (run.parent / "run.rank0.log").read_text(), "the -9 is not the injected kill"
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_0000002"
    assert (ck / "step_0000003.partial").is_dir() and not (ck / "step_0000003").exists()
    # 2) resumes from step 2; SIGKILL at a random later step
    seed = os.environ.get("JTOK_TEST_SEED") or str(random.SystemRandom().randrange(1 << 30))
    # from step 4 on: the resumed run has then completed its step-3 save, which removes the killed save's .partial
    kill_at = random.Random(seed).randint(4, STEPS - 1)
    print(f"JTOK_TEST_SEED={seed}: SIGKILL after step {kill_at}")
    procs = _launch(1, _args(small_dataset, run), run, fresh=True)
    _wait_for_step(run, kill_at, procs)
    procs[0].send_signal(signal.SIGKILL)
    # the kill landed (kill_at < STEPS leaves at least one step to run): not a run that had finished
    assert _wait(procs) == [-signal.SIGKILL]
    assert max(s for s, _ in logged_losses(run)) < STEPS
    assert "step_0000002 at step 2" in (run.parent / "run.rank0.log").read_text()   # "resumed from ..."
    assert not (ck / "step_0000003.partial").exists()
    # 3) resumes again and finishes: bitwise the uninterrupted run
    assert _wait(_launch(1, _args(small_dataset, run), run, fresh=True)) == [0]
    _assert_same(reference, run)


def test_sigterm_on_one_rank_all_save_exit_with_requeue_code_and_resume(small_dataset, reference, tmp_path):
    run = tmp_path / "run"
    args = _args(small_dataset, run, **{"train.save_interval": 0})   # the preemption checkpoint is the only one
    procs = _launch(2, args, run, fresh=True)
    _wait_for_step(run, 2, procs)
    procs[1].send_signal(signal.SIGTERM)       # one rank signalled: all ranks agree, save and stop
    assert _wait(procs) == [REQUEUE_EXIT_CODE] * 2
    ck = run / "checkpoints"
    saved = (ck / "latest").read_text().strip()
    assert (ck / "REQUEUE").read_text().strip() == saved
    stopped = int(saved.split("_")[1])
    assert 2 <= stopped < STEPS
    assert _wait(_launch(2, args, run, fresh=True)) == [0, 0]
    assert not (ck / "REQUEUE").exists()
    assert f"at step {stopped}" in (run.parent / "run.rank0.log").read_text()
    # 2 ranks vs the 1-rank reference: the same samples per step, equal up to the reduction order
    ref = dict(logged_losses(reference))
    got = logged_losses(run)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    for s, loss in got:
        assert loss == pytest.approx(ref[s], rel=1e-5), s


@pytest.mark.slow
def test_sigkill_at_20_random_points(small_dataset, reference, tmp_path):
    """20 SIGKILLs at 1 rank at random points (sometimes mid-save), in chains: a run is killed, resumed, killed
    again at a random point after the last step it logged, ... and finally resumes to the end; every chain ends
    bitwise the uninterrupted run. Chains test more than single kills (a resume from a resumed run's
    checkpoint) and start fewer processes (a process start is most of this test's time)."""
    seed = os.environ.get("JTOK_TEST_SEED") or str(random.SystemRandom().randrange(1 << 30))
    print(f"JTOK_TEST_SEED={seed}")
    rnd = random.Random(seed)
    kills, chain = 0, 0
    while kills < 20:
        run = tmp_path / f"chain{chain}" / "run"
        chain += 1
        chain_kills = 0
        while kills < 20:
            done = max((s for s, _ in logged_losses(run)), default=0)
            if done >= STEPS - 1:
                break
            procs = _launch(1, _args(small_dataset, run), run)
            _wait_for_step(run, min(done + 1 + (rnd.random() < 0.3), STEPS - 1), procs)
            time.sleep(rnd.random() * 0.3)          # lands anywhere in a step or a save
            procs[0].send_signal(signal.SIGKILL)
            codes = _wait(procs)
            assert codes in ([-9], [0]), codes
            if codes == [0]:                        # it finished before the kill (a busy machine): not a kill
                break
            kills += 1
            chain_kills += 1
        assert _wait(_launch(1, _args(small_dataset, run), run)) == [0]
        # a chain whose first run finished before its kill landed has nothing to resume: it is still compared
        if chain_kills:
            assert "resumed from" in (run.parent / "run.rank0.log").read_text()
        _assert_same(reference, run)


@pytest.mark.slow
@pytest.mark.parametrize("stages", ["pp2", "pp2_vpp2"])
def test_pp2_sigkill_resumes_exactly(stages, small_dataset, tmp_path):
    """Pipeline parallelism (2 stages, sharded JTok-M tables of each stage's layers; and 2 interleaved virtual
    stages per rank, 4 layers): both ranks SIGKILLed at a random step, resumed: bitwise the uninterrupted run
    (weights, tables, moments, RNG, every loss)."""
    extra = {"parallel.pipeline_model_parallel_size": 2, "parallel.embedding": "sharded"}
    if stages == "pp2_vpp2":
        extra.update({"parallel.virtual_pipeline_model_parallel_size": 2, "model.num_layers": 4})
    ref = tmp_path / "ref"
    assert _wait(_launch(2, _args(small_dataset, ref, **extra), ref)) == [0, 0]
    run = tmp_path / "run"
    seed = os.environ.get("JTOK_TEST_SEED") or str(random.SystemRandom().randrange(1 << 30))
    kill_at = random.Random(seed).randint(2, STEPS - 1)
    print(f"JTOK_TEST_SEED={seed}: SIGKILL after step {kill_at}")
    procs = _launch(2, _args(small_dataset, run, **extra), run)
    _wait_for_step(run, kill_at, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    assert _wait(procs) == [-9, -9]          # the kill landed on both stages before they finished
    assert not (run / "checkpoints" / f"step_{STEPS:07d}").exists()
    assert _wait(_launch(2, _args(small_dataset, run, **extra), run)) == [0, 0]
    assert "resumed from" in (run.parent / "run.rank0.log").read_text()
    _assert_same(ref, run)
