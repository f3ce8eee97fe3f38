"""pytest plugin (loaded by the project's pytest config): where the suite's time goes, per test and per file.

Every test's wall time (setup + call + teardown) is split into
- ``startup``: process start-up before any work: the ranks of ``run_distributed`` until they are ready to run the
  test's function (fork or spawn, imports, the process group), and the fresh processes a test launches itself
  (torchrun, ``python -m jtok_train``, SLURM jobs) from their creation to the training's first line (imports
  and the config's composition);
- ``work``: the ranks' functions (training, checking inside the ranks);
- ``rest``: what the test process does itself (building data, launching, reading and checking results, and
  the fresh processes' work after their start-up).

The records come from the processes themselves through the file named by ``JTOK_TEST_TIMING`` (set here when
unset, so every child inherits it): ``run_distributed`` appends one line per call, a Trainer one per process
(``jtok_train.testing.startup.note_process_start``, called by the jtok-train command). ``JTOK_TEST_TIMING_REPORT=<file.json>`` writes the whole table; the terminal summary
prints the files and the slowest tests. Nothing here decides a verdict: times are figures, never assertions.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

_durations: dict[str, float] = defaultdict(float)
_session_t0 = 0.0


def pytest_sessionstart(session: pytest.Session) -> None:
    global _session_t0
    _session_t0 = time.time()
    if not os.environ.get("JTOK_TEST_TIMING"):
        fd, path = tempfile.mkstemp(prefix="jtok-test-timing-", suffix=".jsonl")
        os.close(fd)
        os.environ["JTOK_TEST_TIMING"] = path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # the fresh processes a test launches find their test by this variable (pytest's own PYTEST_CURRENT_TEST
    # is set too, but launchers often pass a trimmed environment)
    os.environ["JTOK_TEST_ID"] = item.nodeid
    yield
    os.environ.pop("JTOK_TEST_ID", None)


def pytest_runtest_logreport(report) -> None:
    _durations[report.nodeid] += report.duration


def _read_records() -> list[dict]:
    path = Path(os.environ.get("JTOK_TEST_TIMING", ""))
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def table() -> dict:
    """{"tests": {nodeid: {...}}, "files": {file: {...}}, "total_s": ...} from this session's records."""
    per: dict[str, dict] = {k: {"wall_s": v, "startup_s": 0.0, "work_s": 0.0, "rank_calls": 0, "fresh_processes": 0}
                            for k, v in _durations.items()}
    for r in _read_records():
        t = per.get(r.get("test", ""))
        if t is None:
            continue
        if r["kind"] == "run_distributed":
            t["startup_s"] += r["startup_s"]
            t["work_s"] += r["func_s"]
            t["rank_calls"] += 1
        elif r["kind"] == "process":
            # ranks of one launch start side by side: their wall cost is one rank's
            t["startup_s"] += r["startup_s"] / max(1, r.get("local_world", 1))
            t["fresh_processes"] += 1
    files: dict[str, dict] = defaultdict(lambda: {"wall_s": 0.0, "startup_s": 0.0, "work_s": 0.0, "tests": 0})
    for k, t in per.items():
        t["rest_s"] = max(0.0, t["wall_s"] - t["startup_s"] - t["work_s"])
        f = files[k.split("::")[0]]
        f["tests"] += 1
        for key in ("wall_s", "startup_s", "work_s"):
            f[key] += t[key]
    for f in files.values():
        f["rest_s"] = max(0.0, f["wall_s"] - f["startup_s"] - f["work_s"])
    r3 = lambda d: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in d.items()}   # noqa: E731
    return {"total_s": round(time.time() - _session_t0, 1), "tests": {k: r3(v) for k, v in per.items()},
            "files": {k: r3(v) for k, v in sorted(files.items(), key=lambda kv: -kv[1]["wall_s"])}}


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    data = table()
    if not data["tests"]:
        return
    out = os.environ.get("JTOK_TEST_TIMING_REPORT")
    if out:
        Path(out).write_text(json.dumps(data, indent=1))
    w = terminalreporter.write_line
    w("")
    w(f"jtok-train timing: {len(data['tests'])} tests, {data['total_s']:.0f} s; per file: wall = start-up + "
      "work in ranks + rest (s)")
    for name, f in list(data["files"].items())[:25]:
        w(f"  {f['wall_s']:7.1f} = {f['startup_s']:6.1f} + {f['work_s']:6.1f} + {f['rest_s']:6.1f}  "
          f"({f['tests']:3d} tests)  {name}")
