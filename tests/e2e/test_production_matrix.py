"""The configurations GPU runs use, through the real command line on 2 ranks (MoE + JTok-M): {fp32, bf16} x
{Megatron's DDP optimizer, the distributed optimizer} x {replicated, sharded tables}, with EP 2, activation
recompute and sparse_adamw in some cells. Each cell trains uninterrupted, then again with a SIGKILL at a
random step (drawn from JTOK_TEST_SEED, printed) and an automatic resume; the final checkpoint (weights, table
shards, every optimizer state, RNG states) and every step's logged loss must equal the uninterrupted run's
bitwise. One more cell is killed inside the checkpoint writer, halfway through writing a shard file."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from jtok_train.testing.faults import FAULT_MARK, KILL_AFTER_BYTES, KILL_IN_WRITE
from jtok_train.testing.runs import logged_losses as _losses
from tests.e2e.test_resume import STEPS, _args, _assert_same, _launch, _wait, _wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

FULL = {"model.recompute_granularity": "full", "model.recompute_method": "uniform", "model.recompute_num_layers": 1}
SELECTIVE = {"model.recompute_granularity": "selective", "model.recompute_modules": "[core_attn,layernorm]"}
CELLS = {
    "fp32-ddp-replicated": {},
    "fp32-ddp-sharded-sparse": {"parallel.embedding": "sharded", "jtok.table_optimizer": "sparse_adamw"},
    "fp32-distopt-replicated-full-recompute": {"parallel.use_distributed_optimizer": "true", **FULL},
    "fp32-distopt-sharded": {"parallel.use_distributed_optimizer": "true", "parallel.embedding": "sharded"},
    "bf16-ddp-replicated-selective": {"train.precision": "bf16", **SELECTIVE},
    "bf16-ddp-sharded-ep2": {"train.precision": "bf16", "parallel.embedding": "sharded",
                             "parallel.expert_model_parallel_size": 2},
    "bf16-distopt-replicated-ep2": {"train.precision": "bf16", "parallel.use_distributed_optimizer": "true",
                                    "parallel.expert_model_parallel_size": 2},
    "bf16-distopt-sharded-ep2-full-recompute-sparse": {
        "train.precision": "bf16", "parallel.use_distributed_optimizer": "true", "parallel.embedding": "sharded",
        "parallel.expert_model_parallel_size": 2, "jtok.table_optimizer": "sparse_adamw", **FULL},
}
SEED = int(os.environ.get("JTOK_TEST_SEED", random.SystemRandom().randrange(1 << 30)))


def _kill_all(procs) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    return _wait(procs)


def _assert_settings_took_effect(run, cell: str) -> None:
    """Each cell's settings did what they say, read from the objects the run built (the step metrics under
    setup/, recompute/ and table_opt/ that rank 0 logged for every step), not from its config."""
    import json

    c = CELLS[cell]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    assert len(recs) == STEPS, len(recs)
    for r in recs:
        share = r["setup/optimizer_state_share"]
        if c.get("parallel.use_distributed_optimizer") == "true":
            assert share < 0.95, (cell, share)   # DP 2 shards the moments (EP 2's experts have DP 1: not all)
        else:
            assert share == 1.0, (cell, share)
        assert r["setup/expert_parallel_size"] == c.get("parallel.expert_model_parallel_size", 1), cell
        assert r["setup/bf16_weight_share"] == (1.0 if c.get("train.precision") == "bf16" else 0.0), cell
        # full recompute of chunks of 1 layer: both layers replayed for each of the rank's 2 micro-batches
        assert r["recompute/replayed_layers"] == (4 if c.get("model.recompute_granularity") == "full" else 0), cell
        if c.get("parallel.embedding") == "sharded":   # each rank's shard holds 256 of the 512 rows
            rows = r["table_opt/rows_stepped"]
            assert (0 < rows < 256) if c.get("jtok.table_optimizer") == "sparse_adamw" else rows == 256, (cell, rows)
        else:
            assert "table_opt/rows_stepped" not in r, cell


@pytest.mark.parametrize("cell", list(CELLS))
def test_kill_and_resume_is_bitwise(cell, small_dataset, tmp_path):
    extra = {**CELLS[cell], "train.warmup_fraction": 0.0, "train.lr": 1e-2, "train.min_lr": 1e-3}
    rnd = random.Random(f"{SEED}-{cell}")
    # steps take ~0.1 s here: kill within 3 steps of the end at the latest, anywhere inside a step or a save
    # (from step 2 on: the step-1 checkpoint is complete once step 2 is logged, so there is one to resume from)
    kill_at, delay = rnd.randint(2, STEPS - 3), rnd.random() * 0.1
    print(f"JTOK_TEST_SEED={SEED}: {cell} killed after step {kill_at} + {delay:.2f} s")
    ref = tmp_path / "ref" / "run"
    assert _wait(_launch(2, _args(small_dataset, ref, **extra), ref)) == [0, 0]
    ref_losses = [x for _, x in _losses(ref)]
    assert len(ref_losses) == STEPS and ref_losses[-1] < 0.9 * ref_losses[0], ref_losses   # it learns
    _assert_settings_took_effect(ref, cell)

    run = tmp_path / "run"
    procs = _launch(2, _args(small_dataset, run, **extra), run)
    _wait_for_step(run, kill_at, procs)
    time.sleep(delay)
    codes = _kill_all(procs)
    assert codes == [-signal.SIGKILL] * 2, f"the kill did not land before the run finished: {codes}"
    assert max(s for s, _ in _losses(run)) < STEPS
    assert _wait(_launch(2, _args(small_dataset, run, **extra), run)) == [0, 0]
    assert "resumed from" in (run.parent / "run.rank0.log").read_text()
    _assert_same(ref, run)


def test_kill_inside_the_checkpoint_writer_keeps_the_previous_checkpoint(small_dataset, tmp_path):
    """bf16 + distributed optimizer + sharded tables: rank 0 dies 4 KiB into its shard file of step 3."""
    extra = {**CELLS["bf16-distopt-sharded-ep2-full-recompute-sparse"], "train.warmup_fraction": 0.0,
             "train.lr": 1e-2, "train.min_lr": 1e-3}
    ref = tmp_path / "ref" / "run"
    assert _wait(_launch(2, _args(small_dataset, ref, **extra), ref)) == [0, 0]
    run = tmp_path / "run"
    procs = _launch(2, _args(small_dataset, run, **extra), run, faults={KILL_IN_WRITE: "3:0"})
    deadline = time.monotonic() + 600
    while procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert procs[0].poll() == -signal.SIGKILL, "rank 0 was not killed in the writer"
    assert f"{FAULT_MARK} {KILL_AFTER_BYTES} bytes into a shard file of step_0000003.partial" \
        in (run.parent / "run.rank0.log").read_text(), "rank 0's SIGKILL is not the injected one"
    codes = _kill_all(procs)        # rank 1 fails (or waits) in the save's collectives: stop it
    assert codes[0] == -signal.SIGKILL
    ck = run / "checkpoints"
    partial = ck / "step_0000003.partial"
    # the fault landed mid-write: a shard file of exactly 4096 bytes, no .metadata, step 2 still latest
    sizes = {f.name: f.stat().st_size for f in partial.glob("*.distcp")}
    assert KILL_AFTER_BYTES in sizes.values(), sizes
    assert not (partial / ".metadata").exists() and not (ck / "step_0000003").exists()
    assert (ck / "latest").read_text().strip() == "step_0000002"
    assert _wait(_launch(2, _args(small_dataset, run, **extra), run)) == [0, 0]
    assert "step_0000002 at step 2" in (run.parent / "run.rank0.log").read_text()
    _assert_same(ref, run)
