"""The rooms of jtok_train/ and what each may import (README, Layout): read from the source (every import,
at module level or inside a function), so a new import from a lower layer to a higher one, a private name
taken from another package, a private Megatron name outside compat/, or a module grown past ~400 lines without
a reason fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "jtok_train"

# package -> the jtok_train packages it may import (besides itself). Lowest first; see README "Layout".
ALLOWED: dict[str, set[str]] = {
    "errors": set(),                          # the bottom: jtok_train/errors.py, which every room may import
    "data": set(),
    "analysis": set(),
    "config": {"data"},                       # the vocabulary and DALI checks read the tokenizer / data loader
    "compat": {"config"},                     # the expert-TP rule of the process groups
    "tables": set(),
    "model": {"tables", "config", "compat.megatron"},   # Megatron's aux-loss hooks (its private names' one place)
    "planning": {"model", "tables", "config", "data"},  # data: planning/measure.py only (see below)
    "parallel": {"model", "tables", "config"},      # config: the run config's type
    "checkpoint": {"compat", "config"},
    "inference": {"compat", "config", "data", "model", "tables", "checkpoint"},   # data: the tokenizer check
    "evaluation": {"config", "data", "inference", "checkpoint"},
    "export": {"config", "data", "inference", "checkpoint"},
    "training": {"compat", "config", "data", "model", "parallel", "tables", "planning", "checkpoint", "evaluation"},
}
BOTTOM = {"errors"}   # rooms every room may import
# modules of a package that may import more than the package (the one reason is in their docstring)
EXTRA: dict[str, set[str]] = {
    "planning/measure.py": {"data", "config"},
}
UNRESTRICTED = {"cli", "testing", "__main__", "_lm_eval_hook", "__init__"}   # the top (commands) and test helpers


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of jtok_train in ``path``."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg_parts = mod.split(".")[:-1] if path.name != "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("jtok_train"):
                out.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("jtok_train")]
    return out


def _room(target: str) -> str:
    parts = target.split(".")
    if len(parts) < 2:
        return ""
    if parts[1] == "compat" and len(parts) > 2:
        return f"compat.{parts[2]}"
    return parts[1]


def _allowed(room: str, allowed: set[str]) -> bool:
    return room in allowed or room.split(".")[0] in allowed or room in BOTTOM


def test_no_import_from_a_lower_room_to_a_higher_one():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        own = rel.parts[0].removesuffix(".py")
        if own in UNRESTRICTED:
            continue
        assert own in ALLOWED, f"jtok_train/{own} is a room the layer map does not know: add it to ALLOWED and the README"
        allowed = ALLOWED[own] | EXTRA.get(rel.as_posix(), set())
        for target, _ in _imports(path):
            room = _room(target)
            if room.split(".")[0] in (own, ""):
                continue
            if not _allowed(room, allowed):
                bad.append(f"jtok_train/{rel.as_posix()} imports {target}")
    assert not bad, "imports against the layer map (README, Layout):\n" + "\n".join(bad)


def test_no_private_name_is_imported_across_packages():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        own = path.relative_to(PKG).parts[0]
        for target, names in _imports(path):
            if _room(target).split(".")[0] == own.removesuffix(".py"):
                continue
            bad += [f"jtok_train/{path.relative_to(PKG).as_posix()} imports {target}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_modules_over_400_lines_say_why():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > 420 and "Longer than 400 lines" not in doc:
            long.append(f"jtok_train/{path.relative_to(PKG).as_posix()} ({n} lines)")
    assert not long, "modules over ~400 lines without 'Longer than 400 lines: <why>' in their docstring:\n" + "\n".join(long)


def test_the_layer_map_sees_the_imports_it_checks():
    """The checker itself: it finds a known import of each kind (module level, inside a function, relative)."""
    found = {t for t, _ in _imports(PKG / "config" / "schema.py")}
    assert "jtok_train.data.tokenizer" in found and "jtok_train.data.dali" in found   # the second is in a function
    assert not _allowed("training", ALLOWED["model"]) and _allowed("compat.megatron", ALLOWED["model"])
    assert not _allowed("compat.cpu", ALLOWED["model"])


def _megatron_private(source: str) -> list[str]:
    """Every private Megatron name (a module or name with a leading underscore, not a dunder) ``source`` imports."""
    def private(name: str) -> bool:
        return any(p.startswith("_") and not p.startswith("__") for p in name.split("."))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "megatron":
            found += [f"{node.module}.{a.name}" for a in node.names if private(node.module) or private(a.name)]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "megatron" and private(a.name)]
    return found


def test_private_megatron_names_only_in_compat():
    """Megatron's private names live in one place (jtok_train/compat/, with the versions they were checked on)."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] != "compat":
            bad += [f"jtok_train/{rel.as_posix()} imports {n}" for n in _megatron_private(path.read_text())]
    assert not bad, "private Megatron names outside jtok_train/compat/ (move them there):\n" + "\n".join(bad)


def test_the_private_name_rule_finds_a_planted_violation():
    planted = ("from megatron.core.datasets.indexed_dataset import _IndexReader, DType\n"
               "import megatron.core._internal.x\n"
               "def f():\n    from megatron.core.tensor_parallel._private import y\n"
               "from megatron.core import parallel_state\nfrom megatron.core.models import __version__\n")
    assert _megatron_private(planted) == ["megatron.core.datasets.indexed_dataset._IndexReader",
                                          "megatron.core._internal.x", "megatron.core.tensor_parallel._private.y"]
