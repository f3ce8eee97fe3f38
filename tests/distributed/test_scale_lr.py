"""``jtok.scale_lr_mult``: the per-dimension scales s_l of JTok / JTok-M in their own parameter group (the pilot of
static JTok's init, benchmarks/quality/README.md), on 2 gloo ranks: the scales move by the multiplied LR and
nothing else changes; the group survives a checkpoint in the production configuration (bf16, distributed
optimizer, sharded tables); resuming with another multiplier is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed

# constant LR, no warmup: step 1 uses lr itself; scale_init 1 so the tables (and s) get a gradient at step 1
ONE_STEP = {"train.train_iters": 1, "train.lr": 1e-3, "train.min_lr": 1e-3, "train.lr_schedule": "constant",
            "train.warmup_fraction": 0.0, "jtok.scale_init": 1.0, "logging.wandb": "false"}


def _one_step(data: dict, run_dir: str, mult: float) -> dict:
    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer

    tr = build_trainer(compose(tiny_overrides(data, run_dir, jtok="jtok", **ONE_STEP, **{"jtok.scale_lr_mult": mult})))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit()
    after = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    groups = []
    for opt in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer]):
        for g in opt.optimizer.param_groups:
            groups.append({"lr": g["lr"], "wd": g["weight_decay"],
                           "scales": sum(bool(getattr(p, "jtok_scale", False)) for p in g["params"]),
                           "params": len(g["params"])})
    return {"delta": {n: (after[n] - before[n]).double().numpy() for n in before}, "groups": groups}


def test_scales_move_by_the_multiplied_lr_and_nothing_else_changes(small_dataset, tmp_path):
    plain = run_distributed(_one_step, 2, small_dataset, str(tmp_path / "m1"), 1.0, timeout=600)[0]
    ten = run_distributed(_one_step, 2, small_dataset, str(tmp_path / "m10"), 10.0, timeout=600)[0]
    # at 1 no group is added (old checkpoints keep their groups); at 10 the two scales (2 layers) have their own,
    # with 10x the LR and no weight decay (they are 1-D, as before)
    assert len(ten["groups"]) == len(plain["groups"]) + 1, (plain["groups"], ten["groups"])
    own = [g for g in ten["groups"] if g["scales"]]
    assert len(own) == 1 and own[0]["scales"] == own[0]["params"] == 2, ten["groups"]
    assert own[0]["lr"] == pytest.approx(1e-2, rel=1e-12) and own[0]["wd"] == 0.0
    assert all(g["lr"] == pytest.approx(1e-3, rel=1e-12) for g in ten["groups"] if not g["scales"])
    scales = [n for n in plain["delta"] if n.endswith(".scale")]
    assert len(scales) == 2, scales
    for n, d in plain["delta"].items():
        if n in scales:
            # Adam's first step is lr * g / (|g| + eps): |delta| = lr wherever |g| >> eps (1e-8)
            big = np.abs(d) > 1e-4
            assert big.mean() > 0.9, n
            ratio = ten["delta"][n][big] / d[big]
            assert np.abs(ratio - 10).max() < 1e-3, (n, ratio.min(), ratio.max())
        else:
            # every other parameter sees the same gradient at step 1 and the same LR: bitwise the same step
            assert np.array_equal(ten["delta"][n], d), n


PRODUCTION = {"train.precision": "bf16", "parallel.use_distributed_optimizer": "true", "parallel.embedding": "sharded",
              "train.lr": 1e-2, "train.min_lr": 1e-3, "train.warmup_fraction": 0.0, "logging.wandb": "false",
              "train.save": "true", "jtok.scale_init": 1.0, "jtok.scale_lr_mult": 10.0}


# both make a parameter group whose identifier keys on megatron-core 0.16.1 (wd_mult, lr_mult, ...) equal another
# group's: the scales' (no weight decay, like the norms), the replicated table's (the weight decay of the rest)
CELLS = {"scales": {}, "replicated-table-lr": {"parallel.embedding": "replicated", "jtok.lr_mult": 3.0}}


def _save_resume_refuse(data: dict, root: str, cell: dict) -> dict:
    from jtok_train.config import compose
    from jtok_train.testing.state import compare_states, global_state
    from jtok_train.errors import CheckpointError
    from jtok_train.training.trainer import build_trainer

    def trainer(run_dir, **extra):
        return build_trainer(compose(tiny_overrides(data, run_dir, jtok="jtok", **{**PRODUCTION, "train.train_iters": 6,
                                                                              **cell, **extra})))

    whole = trainer(f"{root}/whole")
    whole.cfg.train.save = False
    whole.fit()
    ref = global_state(whole)
    first = trainer(f"{root}/run")
    first.cfg.train.train_iters = 3          # the 6-step schedule, saved at step 3
    first.fit()
    saved = global_state(first)
    second = trainer(f"{root}/run")           # auto-resume
    assert second.start_step == 3
    diffs = compare_states(saved, global_state(second), rel=0.0)   # the load is bitwise
    assert any(".scale" in k and k.startswith("optim/") for k in diffs), sorted(diffs)[:8]
    second.fit()
    # the resumed run ends where the uninterrupted one does (same reduction order: bitwise)
    compare_states(ref, global_state(second), rel=0.0)
    try:
        trainer(f"{root}/run", **{"jtok.scale_lr_mult": 1.0, "train.train_iters": 8})
    except CheckpointError as e:
        return {"refusal": str(e)}
    return {"refusal": None}


@pytest.mark.parametrize("cell", list(CELLS))
def test_own_scale_lr_resumes_bitwise_in_production_config_and_a_change_is_refused(cell, small_dataset, tmp_path):
    """Saved at step 3 of 6, resumed: the load is bitwise and the run ends bitwise where the uninterrupted one
    does (before the distributed optimizer's groups were paired by position, the scales' group took the norms'
    LR on resume: 11% off after 3 steps)."""
    out = run_distributed(_save_resume_refuse, 2, small_dataset, str(tmp_path), CELLS[cell], timeout=900)
    for r in out:
        msg = r["refusal"]
        assert msg and "\n" not in msg and "jtok.scale_lr_mult: 10.0 -> 1.0" in msg, msg
