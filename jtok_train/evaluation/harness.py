"""lm-eval's own command line with jtok-train's model (``--model jtok``) and tasks (demo_cloze) registered.

    jtok-lm-eval --model jtok --model_args checkpoint=runs/demo --tasks demo_cloze
    python -m jtok_train.evaluation.harness run --model jtok --model_args checkpoint=runs/demo --tasks arc_easy

The stock ``lm_eval`` command knows ``--model jtok`` too (jtok-train's install registers it at start-up:
``jtok_train/_lm_eval_hook.py``); this one differs only in pointing ``--include_path`` at jtok-train's task
directory when none is given. Every lm-eval option works.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def _with_tasks_dir(argv: list[str]) -> list[str]:
    from jtok_train.evaluation import TASKS_DIR

    out = list(argv)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in out):
        return out   # lm-eval takes one directory: the user's own (point it at a copy holding demo_cloze too)
    if any(a in ("-h", "--help") for a in out) or not out or out[0] in ("ls", "validate"):
        return out
    return out + ["--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> int:
    import jtok_train.evaluation  # noqa: F401  (registers --model jtok)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + _with_tasks_dir(list(sys.argv[1:] if argv is None else argv))
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
