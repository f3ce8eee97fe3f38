"""Imports at the top of modules (issue 35): an import inside a function (a ``def`` or ``async def``, nested
ones and methods too) says why it is there, in a comment on one of its lines or on the comment line right
above it, in one of five forms:

    # lazy: cost (<what>, <measured>)        e.g. # lazy: cost (torch + megatron.core, 5-8 s: not for --help)
    # lazy: optional (<package>)             a dependency that may be absent (nvidia-dali, scipy)
    # lazy: cycle (<module>)                 the module imports this one at its top
    # lazy: version (<what differs>)         a module or name some supported release lacks
    # lazy: child process (<why>)            code that runs in a spawned/forked child and imports there

Module-level ``__getattr__`` lazy exports are functions too: their imports carry the same comment. Read from
the source with ``ast``: nothing of the package is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.check

PKG = Path(__file__).resolve().parents[2] / "jtok_train"
REASONS = ("cost", "optional", "cycle", "version", "child process")
_LAZY = re.compile(r"#\s*lazy:\s*(?P<reason>[a-z][a-z ]*?)\s*\(\s*\S.*\)")


def _says_why(text: str) -> bool:
    m = _LAZY.search(text)
    return m is not None and m.group("reason") in REASONS


def uncommented_imports(source: str) -> list[tuple[int, str]]:
    """(line, import) of every import inside a function without a ``# lazy: <reason> (...)`` comment (one of
    REASONS) on one of its lines or on a comment line right above it (not another statement's trailing
    comment: each import of a run says why itself)."""
    lines = source.splitlines()
    bad: list[tuple[int, str]] = []

    def explained(node: ast.stmt) -> bool:
        own = lines[node.lineno - 1 : node.end_lineno]
        above = lines[node.lineno - 2] if node.lineno >= 2 else ""
        return any(_says_why(line) for line in own) or (above.lstrip().startswith("#") and _says_why(above))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)) and not explained(child):
                bad.append((child.lineno, ast.unparse(child)))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(source), False)
    return bad


def test_every_import_inside_a_function_says_why():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        bad += [f"jtok_train/{rel}:{line}: {text}" for line, text in uncommented_imports(path.read_text())]
    assert not bad, ("imports inside functions without a reason: move them to the top of the module, or say "
                     "why on the line or the line above, as '# lazy: <reason> (...)' with reason one of "
                     f"{', '.join(REASONS)}:\n" + "\n".join(bad))


def test_the_check_finds_a_planted_violation():
    planted = (
        "import os\n"                                                     # 1  module level: no comment needed
        "def f():\n"                                                      # 2
        "    import torch\n"                                              # 3  no comment
        "    import numpy as np  # lazy: cost (numpy, 0.2 s)\n"           # 4
        "    # lazy: optional (scipy)\n"                                  # 5
        "    from scipy import optimize\n"                                # 6
        "    import json  # lazy: because (no such reason)\n"             # 7  unknown reason
        "    import math  # lazy: cost ()\n"                              # 8  nothing said in the parentheses
        "    # a comment that is not a reason\n"                          # 9
        "    import re\n"                                                 # 10
        "    class C:\n"                                                  # 11
        "        def g(self):\n"                                          # 12
        "            from a import (  # lazy: cycle (a)\n"                # 13
        "                b,\n"                                            # 14
        "            )\n"                                                 # 15
        "            from c import (\n"                                   # 16
        "                d,  # lazy: version (c.d: only on 2.x)\n"        # 17
        "            )\n"                                                 # 18
        "async def h():\n"                                                # 19
        "    import zlib  # lazy: child process (runs in the rank)\n"     # 20
        "    import sys\n"                                                # 21 the line above is another import's
        "def __getattr__(name):\n"                                        # 22
        "    from pkg import heavy\n"                                     # 23 lazy exports say why too
        "    return heavy\n"                                              # 24
    )
    assert uncommented_imports(planted) == [(3, "import torch"), (7, "import json"), (8, "import math"),
                                            (10, "import re"), (21, "import sys"), (23, "from pkg import heavy")]
    assert uncommented_imports("def f():\n    import torch  # lazy: cost (torch, 2-5 s)\n") == []
