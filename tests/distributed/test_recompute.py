"""Activation recompute (Megatron's own knobs, model.recompute_*) with JTok / JTok-M, on 2 real ranks: the JTok
rows are still there when Megatron's full recompute replays a layer in the backward (the replay really
happens: counted), and the weights and optimizer states after 6 steps equal the run without recompute
bitwise in fp32 (Megatron's recompute replays the same float operations); non-finite gradients under a finite
loss follow train.nan_policy."""

from __future__ import annotations

import math

import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides
from tests.distributed.test_training import LEARNING, _learned

pytestmark = pytest.mark.distributed

FULL_UNIFORM = {"model.recompute_granularity": "full", "model.recompute_method": "uniform",
                "model.recompute_num_layers": 1}
FULL_BLOCK = {"model.recompute_granularity": "full", "model.recompute_method": "block", "model.recompute_num_layers": 1}
SELECTIVE = {"model.recompute_granularity": "selective", "model.recompute_modules": "[core_attn,layernorm]"}


def _runs(runs: list[list[str]]) -> list[dict]:
    from jtok_train.config import compose
    from jtok_train.testing.state import global_state
    from jtok_train.training.trainer import build_trainer

    out = []
    for overrides in runs:
        tr = build_trainer(compose(overrides))
        res = tr.fit()
        replays = sum(getattr(layer, "replays", 0) for layer in tr.unwrapped.decoder.layers)
        out.append({"losses": res.losses, "state": global_state(tr), "replays": replays})
    return out


@pytest.mark.parametrize("variant,extra", [
    ("jtokm", {"parallel.embedding": "sharded"}),
    ("jtok", {"jtok.scale_init": 0.5, "parallel.use_distributed_optimizer": "true"}),
])
def test_recompute_gives_bitwise_the_same_training(variant, extra, small_dataset, tmp_path):
    from jtok_train.testing.state import compare_states

    cases = {"none": {}, "full_uniform": FULL_UNIFORM, "full_block": FULL_BLOCK, "selective": SELECTIVE}
    runs = [tiny_overrides(small_dataset, str(tmp_path / name), jtok=variant, **LEARNING, **extra, **rc)
            for name, rc in cases.items()]
    got = dict(zip(cases, run_distributed(_runs, 2, runs, timeout=900)[0]))
    _learned(got["none"], "no recompute")
    assert got["none"]["replays"] == 0 and got["selective"]["replays"] == 0
    # full, uniform chunks of 1 layer: both layers replayed for each of the 2 micro-batches of each of 6 steps
    assert got["full_uniform"]["replays"] == 2 * 2 * 6, got["full_uniform"]["replays"]
    assert got["full_block"]["replays"] == 1 * 2 * 6, got["full_block"]["replays"]   # block: the first layer only
    bad = {}
    for name in ("full_uniform", "full_block"):
        diffs = compare_states(got["none"]["state"], got[name]["state"], rel=float("inf"))
        assert len(diffs) > 20 and any("token_table" in k for k in diffs), name
        differ = sorted(k for k, v in diffs.items() if v > 0)
        if differ or got[name]["losses"] != got["none"]["losses"]:
            bad[name] = (differ[:4], got[name]["losses"], got["none"]["losses"])
    assert not bad, bad
    # selective recompute replays submodules through Megatron's CheckpointWithoutOutput, whose backward hands the
    # input gradient back through its own autograd node: the residual stream's gradient terms are summed in
    # another order, so the result equals the plain run to fp32 rounding, not bitwise (measured after 6 steps:
    # up to 5.4e-5 relative per tensor, in Adam's second moments, which square the gradient; weights less; on
    # another CPU type, AMD EPYC, 4.3e-4 in the word embedding's second moment and 2.8e-4 in the sharded JTok-M
    # table's rows: Adam divides by sqrt(v), so the rounding of entries whose moments are near zero grows step
    # by step; a row gradient lost in a replay would move tensors by 1e-2 or more)
    diffs = compare_states(got["none"]["state"], got["selective"]["state"], rel=float("inf"))
    worst = max(diffs.items(), key=lambda kv: kv[1])
    assert worst[1] <= 2e-3, worst
    weights = max((v, k) for k, v in diffs.items() if k.startswith("model/"))
    assert weights[0] <= 1e-3, (weights, sorted(diffs.items(), key=lambda kv: -kv[1])[:4])
    assert got["selective"]["losses"] == pytest.approx(got["none"]["losses"], rel=1e-6)


def _nan_gradient(data: dict, root: str) -> dict:
    """A NaN in one backbone gradient at step 3 (the loss stays finite)."""
    import numpy as np

    from jtok_train.config import compose
    from jtok_train.testing.state import global_state
    from jtok_train.checkpoint import latest_checkpoint
    from jtok_train.errors import NonFiniteLossError
    from jtok_train.training.train_module import TrainModule
    from jtok_train.training.trainer import build_trainer

    real = TrainModule.run_schedule
    hits = []

    def poisoned(self, batches, forward_only):
        loss = real(self, batches, forward_only)
        if not forward_only:
            self._calls = getattr(self, "_calls", 0) + 1
            if self._calls == 3:
                p = next(p for n, p in self.model.named_parameters() if "linear_qkv" in n)
                p.main_grad.view(-1)[0] = float("nan")
                hits.append(loss)
        return loss

    TrainModule.run_schedule = poisoned
    out = {}
    prod = {"train.precision": "bf16", "parallel.use_distributed_optimizer": "true", "parallel.embedding": "sharded",
            "train.save": "true", "train.train_iters": 5}
    try:
        res = build_trainer(compose(tiny_overrides(data, f"{root}/skip", **{**prod, "train.nan_policy": "skip"}))).fit()
        out["skip"] = {"losses": res.losses, "skipped": res.final_metrics["skipped_steps"]}
        tr = build_trainer(compose(tiny_overrides(data, f"{root}/stop", **prod)))
        try:
            tr.fit()
            out["stop"] = "no error"
        except NonFiniteLossError as e:
            out["stop"] = str(e)
        state = global_state(tr)
        out["finite"] = all(np.isfinite(v).all() for v in state.values())
        out["latest"] = latest_checkpoint(f"{root}/stop").name

        # a NaN *loss* skipped with sharded tables: that step's row gradients are collected, not carried into the
        # next step (the table holds no pending micro-batch when a step starts)
        def nan_loss(self, batches, forward_only):
            loss = real(self, batches, forward_only)
            if not forward_only:
                self._calls2 = getattr(self, "_calls2", 0) + 1
                if self._calls2 == 3:
                    return float("nan")
            return loss

        TrainModule.run_schedule = nan_loss
        tr = build_trainer(compose(tiny_overrides(data, f"{root}/nanloss", **{**prod, "train.nan_policy": "skip"})))
        pending = []
        zero = tr.module.table.zero_grad
        tr.module.table.zero_grad = lambda: pending.append(len(tr.module.table._in_backward)) or zero()
        res = tr.fit()
        out["nan_loss"] = {"skipped": res.final_metrics["skipped_steps"], "pending": pending}
    finally:
        TrainModule.run_schedule = real
    out["hits"] = hits
    return out


def test_non_finite_gradient_under_a_finite_loss_follows_nan_policy(small_dataset, tmp_path):
    out = run_distributed(_nan_gradient, 2, small_dataset, str(tmp_path), timeout=900)[0]
    assert len(out["hits"]) == 2 and all(math.isfinite(x) for x in out["hits"])   # injected, loss finite
    assert out["skip"]["skipped"] == 1 and all(math.isfinite(x) for x in out["skip"]["losses"])
    assert "gradient norm is nan" in out["stop"] and "saved the last good step 2" in out["stop"], out["stop"]
    assert "\n" not in out["stop"]
    assert out["finite"] and out["latest"] == "step_0000002"
    assert out["nan_loss"]["skipped"] == 1 and out["nan_loss"]["pending"] == [0] * 5, out["nan_loss"]
