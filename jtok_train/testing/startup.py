"""The start-up record of a fresh process for the test suite's timing (jtok_train/testing/timing.py). Imports
nothing beyond the standard library and psutil: the jtok-train command calls it in every run, where pytest is not
installed."""

from __future__ import annotations

import json
import os
import time


def note_process_start() -> None:
    """One record of this process's start-up (creation to here) in $JTOK_TEST_TIMING, when the suite's timing is
    on (a no-op otherwise). A rank of run_distributed is counted by run_distributed instead."""
    path = os.environ.get("JTOK_TEST_TIMING")
    if not path or os.environ.get("JTOK_TEST_RANK") == "1":
        return
    try:
        import psutil  # lazy: cost (psutil, 0.05 s: only with the suite's timing on; its failure fails no run)

        startup = time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a timing record must never fail a run
        return
    rec = {"kind": "process", "test": os.environ.get("JTOK_TEST_ID", ""), "startup_s": round(startup, 3),
           "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", "1"))}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
