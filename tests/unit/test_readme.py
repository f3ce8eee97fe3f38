"""The README as written: every `make` target it names exists, every command of its usage table is an installed
console script (or a script of the repository), every file and docs page it links exists. Its config-error
example is taken from it and run by tests/unit/test_config.py; its demo command by tests/e2e/test_cli.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.check

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-z0-9][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make ([a-z0-9][\w-]*)", README)) | set(re.findall(r"^make ([a-z0-9][\w-]*)", README, re.M))
    assert named and not named - targets, f"the README names make targets the Makefile lacks: {named - targets}"


def test_usage_table_commands_exist():
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    rows = [line for line in README.splitlines() if line.startswith("| `")]
    commands = [re.match(r"\| `([^`]+)`", r).group(1) for r in rows]
    jtok = {c.split()[0] for c in commands if c.startswith("jtok-")}
    assert {"jtok-train", "jtok-data", "jtok-plan", "jtok-generate", "jtok-eval", "jtok-export"} <= jtok
    assert not jtok - scripts, f"usage-table commands that are not console scripts: {jtok - scripts}"
    for c in commands:
        for script in re.findall(r"bash ([\w/.-]+\.sh)", c):
            assert (ROOT / script).is_file(), script


def test_linked_files_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    paths = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(paths) > 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing
    for p in re.findall(r"`((?:launch|scripts|docker|benchmarks)/[\w/.-]+)`", README):
        assert (ROOT / p).exists(), p
