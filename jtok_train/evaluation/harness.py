"""lm-eval's own command line with jtok-train's model (``--model jtok``) and tasks (demo_cloze) registered.

    jtok-lm-eval --model jtok --model_args checkpoint=runs/demo --tasks demo_cloze
    python -m jtok_train.evaluation.harness run --model jtok --model_args checkpoint=runs/demo --tasks arc_easy

The stock ``lm_eval`` command knows ``--model jtok`` too (jtok-train's install registers it at start-up:
``jtok_train/_lm_eval_hook.py``); this one differs only in pointing ``--include_path`` at jtok-train's task
directory when none is given. Every lm-eval option works.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from typing import Any

from lm_eval.__main__ import cli_evaluate

from jtok_train.evaluation import TASKS_DIR  # importing the package registers --model jtok

__all__ = ["main", "resolve_tasks", "TaskError"]


class TaskError(ValueError):
    """An unknown task name or a task directory that is not one (one line, with a suggestion)."""


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], with_stock: bool) -> Any:
    """lm-eval's TaskManager over ``paths``, and over the tasks lm-eval ships when ``with_stock`` (indexing its
    ~15,000 task YAML files takes 9-18 s on a 2-core machine, in every process that evaluates: built once per
    process and paths, and only when a task asked for is not in ``paths``)."""
    from lm_eval.tasks import TaskManager  # lazy: cost (lm_eval.tasks, 0.7-2 s: jtok-lm-eval --help goes without it)

    return TaskManager(include_path=list(paths), include_defaults=with_stock)


def resolve_tasks(names: list[str], include_path: str = "") -> Any:
    """lm-eval's TaskManager with jtok-train's tasks; an unknown name raises TaskError (with a suggestion)."""
    paths = [str(TASKS_DIR)] + [p for p in include_path.split(",") if p]
    for p in paths[1:]:
        if not os.path.isdir(p):
            raise TaskError(f"include_path={p} is not a directory of lm-eval task YAML files")
    tm = _task_manager(tuple(paths), False)       # demo_cloze and the user's own tasks: no stock index
    if not set(names) <= set(tm.all_tasks):
        tm = _task_manager(tuple(paths), True)
    known = set(tm.all_tasks)
    for n in names:
        if n not in known:
            near = difflib.get_close_matches(n, sorted(known), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise TaskError(f"unknown task {n!r}{hint}: see `lm_eval ls tasks` for the names; demo_cloze runs "
                             "without internet access")
    return tm


def _with_tasks_dir(argv: list[str]) -> list[str]:
    out = list(argv)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in out):
        return out   # lm-eval takes one directory: the user's own (point it at a copy holding demo_cloze too)
    if any(a in ("-h", "--help") for a in out) or not out or out[0] in ("ls", "validate"):
        return out
    return out + ["--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> int:
    sys.argv = [sys.argv[0]] + _with_tasks_dir(list(sys.argv[1:] if argv is None else argv))
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
