"""train.callbacks: a callback of the user's own, named in the config, runs after the built-in ones on every
rank (each step's metrics, the end of the run); a bad name is a one-line config error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jtok_train.testing import run_distributed
from jtok_train.training.callbacks import Callback
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed


class StepRecorder(Callback):
    """Appends (rank, step, loss) per step and the end of the run to <run_dir>/recorded.<rank>.jsonl."""

    def __init__(self, cfg):
        self.path = Path(cfg.train.run_dir)

    def _write(self, trainer, rec):
        with open(self.path / f"recorded.{trainer.rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def on_step_end(self, trainer, done, metrics):
        self._write(trainer, {"step": done, "loss": metrics["loss"]})

    def on_fit_end(self, trainer, result):
        self._write(trainer, {"end": result.steps})


def not_a_callback(cfg):
    return object()


def _fit(overrides: list[str]) -> list[str]:
    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer

    tr = build_trainer(compose(overrides))
    names = [type(c).__name__ for c in tr.callbacks]
    tr.fit()
    return names


def _refused(overrides: list[str]) -> str:
    from jtok_train.config import ConfigError, compose
    from jtok_train.training.trainer import build_trainer

    try:
        build_trainer(compose(overrides))
    except ConfigError as e:
        return str(e)
    return "no error"


def test_own_callback_runs_after_the_built_in_ones_on_every_rank(small_dataset, tmp_path):
    run = tmp_path / "run"
    names = run_distributed(_fit, 2, tiny_overrides(small_dataset, str(run), **{
        "train.callbacks": "[tests.distributed.test_callbacks:StepRecorder]"}))
    assert names[0] == names[1] and names[0][-1] == "StepRecorder" and "CheckpointCallback" in names[0], names
    logged = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    for rank in (0, 1):
        recs = [json.loads(x) for x in (run / f"recorded.{rank}.jsonl").read_text().splitlines()]
        assert recs[-1] == {"end": 3} and [r["step"] for r in recs[:-1]] == [1, 2, 3], recs
        assert all(r["loss"] == logged[r["step"]] for r in recs[:-1]), (recs, logged)


def test_bad_callback_names_are_config_errors(small_dataset, tmp_path):
    from jtok_train.config import ConfigError, compose
    from jtok_train.config.schema import validate

    cfg = compose(tiny_overrides(small_dataset, str(tmp_path / "a"), **{"train.callbacks": "[no_colon_here]"}))
    with pytest.raises(ConfigError, match=r"train.callbacks=.*'no_colon_here' is not 'package.module:name'"):
        validate(cfg)
    msgs = [run_distributed(_refused, 1, tiny_overrides(small_dataset, str(tmp_path / name), **{
        "train.callbacks": f"[{spec}]"}))[0] for name, spec in
        (("b", "tests.distributed.no_such_module:X"), ("c", "tests.distributed.test_callbacks:not_a_callback"))]
    assert "'tests.distributed.no_such_module:X' cannot be imported (ModuleNotFoundError" in msgs[0], msgs
    assert "returned object, not a jtok_train.training.callbacks.Callback" in msgs[1], msgs
    assert all("\n" not in m for m in msgs)
