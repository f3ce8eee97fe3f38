"""In-loop downstream evaluation (eval.tasks) on real gloo processes: logged next to the validation loss at
eval.interval, data-parallel over the ranks with sharded JTok tables, and the same accuracy on 1 and 2 ranks as
jtok-eval's on the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed

LIMIT = 7          # odd: the 2 ranks get 4 and 3 documents, lm-eval pads the second


def _eval_overrides(data: dict, run_dir: str, **extra) -> list[str]:
    return tiny_overrides(data, run_dir, **{"parallel.embedding": "sharded", "eval.tasks": "[demo_cloze]",
                                            "eval.limit": str(LIMIT), "eval.batch_size": "3", **extra})


def _fit(overrides: list[str]) -> dict:
    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer

    res = build_trainer(compose(overrides)).fit()
    return {k: v for k, v in res.final_metrics.items() if k.startswith("eval/")}


def _jtok_eval(checkpoint: str) -> dict:
    import lm_eval

    from jtok_train.cli.eval import resolve_tasks
    from jtok_train.evaluation import JTokLM

    lm = JTokLM(checkpoint=checkpoint, batch_size=5)
    res = lm_eval.simple_evaluate(model=lm, tasks=["demo_cloze"], limit=LIMIT, task_manager=resolve_tasks(["demo_cloze"]),
                                  log_samples=False, bootstrap_iters=0)
    return {f"eval/demo_cloze/{k.split(',')[0]}": v for k, v in res["results"]["demo_cloze"].items()
            if "," in k and "stderr" not in k}


@pytest.fixture(scope="module")
def trained(small_dataset, tmp_path_factory) -> Path:
    """3 steps with sharded tables, validation and downstream evaluation every 2 steps, saved."""
    run = tmp_path_factory.mktemp("inloop") / "run"
    run_distributed(_fit, 1, _eval_overrides(small_dataset, str(run), **{"train.save": "true", "eval.interval": "2",
                                                                       "train.eval_interval": "2"}), timeout=400)
    return run


@pytest.mark.check
def test_logged_next_to_validation_loss(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/demo_cloze/acc" in r}
    valids = {r["step"] for r in rows if "valid_loss" in r}
    assert sorted(evals) == [2, 3] and {2, 3} <= valids
    for r in evals.values():
        # an accuracy over LIMIT documents: a multiple of 1/LIMIT in [0, 1]
        for key in ("eval/demo_cloze/acc", "eval/demo_cloze/acc_norm"):
            assert 0 <= r[key] <= 1 and abs(r[key] * LIMIT - round(r[key] * LIMIT)) < 1e-9


@pytest.mark.slow
def test_same_accuracy_on_1_and_2_ranks_as_jtok_eval(trained, small_dataset, tmp_path):
    """1 rank: the evaluation after step 3 of the run that saved the checkpoint; 2 ranks: that checkpoint resumed
    at its last step (no training, the evaluation after the last step, on the same weights); and jtok-eval."""
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    one = {k: v for k, v in [r for r in rows if r["step"] == 3 and "eval/demo_cloze/acc" in r][-1].items()
           if k.startswith("eval/")}
    ckpt = str(trained / "checkpoints" / "step_0000003")
    two = run_distributed(_fit, 2, _eval_overrides(small_dataset, str(tmp_path / "r2"), **{"train.resume_from": ckpt}),
                          timeout=400)
    ref = run_distributed(_jtok_eval, 1, ckpt, timeout=400)[0]
    assert set(ref) == {"eval/demo_cloze/acc", "eval/demo_cloze/acc_norm"}
    assert one == ref and two[0] == ref and two[1] == ref, (one, two, ref)


def test_bad_eval_settings_are_config_errors(small_dataset, tmp_path):
    from jtok_train.config import ConfigError, compose
    from jtok_train.config.schema import validate
    from jtok_train.evaluation.in_loop import DownstreamEvaluator

    cfg = compose(_eval_overrides(small_dataset, str(tmp_path / "x"), **{"eval.tasks": "[demo_cloz]"}))
    with pytest.raises(ConfigError, match=r"eval.tasks: unknown task 'demo_cloz' \(did you mean demo_cloze"):
        DownstreamEvaluator(cfg, model=None, tokenizer=None, device=None)   # the tasks are checked first

    cfg = compose(_eval_overrides(small_dataset, str(tmp_path / "x"), **{"eval.interval": "-1"}))
    with pytest.raises(ConfigError, match=r"eval.interval=-1 is invalid"):
        validate(cfg)
    cfg = compose(_eval_overrides(small_dataset, str(tmp_path / "x"), **{"eval.limit": "0"}))
    with pytest.raises(ConfigError, match=r"eval.limit=0"):
        validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"parallel.expert_model_parallel_size": "2"},
                                    {"parallel.tensor_model_parallel_size": "2", "parallel.sequence_parallel": "true"}],
                         ids=["ep2", "tp2_sp"])
def test_expert_and_tensor_parallel_runs_score_like_jtok_eval(small_dataset, tmp_path, layout):
    """Trained and evaluated on 2 ranks with expert parallelism (the dispatch is collective) or tensor + sequence
    parallelism (ranks share requests, logits gathered, sequences padded to a multiple of 2): the accuracy after
    the last step equals jtok-eval's on the saved checkpoint, at one rank."""
    run = tmp_path / "run"
    got = run_distributed(_fit, 2, _eval_overrides(small_dataset, str(run), **{"train.save": "true", **layout}),
                          timeout=400)
    ref = run_distributed(_jtok_eval, 1, str(run / "checkpoints" / "step_0000003"), timeout=400)[0]
    assert got[0] == ref and got[1] == ref, (got, ref)
