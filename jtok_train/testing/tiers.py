"""pytest plugin (loaded by the project's pytest config): the ``check`` tier, `make check`.

`make check` (``pytest -m check``) is the loop a developer runs after every edit, at most 3 minutes on a 2-core
machine: every unit test (tests/unit, kernels/tests) not marked ``slow`` or ``e2e`` (a unit test that starts a
command line or an interpreter as a fresh process: a second each at best, 5-15 s with the imports), plus the
tests marked ``@pytest.mark.check`` by hand: one 2-rank smoke per room of jtok_train (tables, model, parallel,
checkpoint, training, inference, evaluation, export; the kernels' own tests are unit tests). `make test` runs
everything, the check tier included.
"""

from __future__ import annotations

import pytest

UNIT_DIRS = ("tests/unit/", "kernels/tests/")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "check: the fast tier (make check): unit tests and one 2-rank smoke per room")
    config.addinivalue_line("markers", "e2e: starts a command line or interpreter as a fresh process (make test only)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        if item.nodeid.startswith(UNIT_DIRS) and not (item.get_closest_marker("slow") or item.get_closest_marker("e2e")):
            item.add_marker(pytest.mark.check)
