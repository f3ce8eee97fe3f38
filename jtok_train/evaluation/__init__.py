"""Evaluation the way the paper reports it: lm-evaluation-harness over jtok-train checkpoints (``jtok-eval``,
``--model jtok``), the bundled ``demo_cloze`` task, in-loop downstream evaluation, Hugging Face export.

Importing this package registers the ``jtok`` model with lm-eval."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"lm-eval task directory shipped with jtok-train (demo_cloze): pass it as include_path."

from jtok_train.evaluation.lm import EvalInputError, JTokLM, TokenScoringLM  # noqa: E402  (registers "jtok")

__all__ = ["TASKS_DIR", "EvalInputError", "JTokLM", "TokenScoringLM"]
