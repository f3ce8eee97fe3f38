"""run_distributed's ranks (forked from a server that preloaded the training stack): a rank that raises, hangs
or dies fails only its own call, with its traceback or exit code, and the next call gets healthy ranks; what one
call leaves in its ranks (environment variables, RNG seeds, threads, process groups, Megatron's parallel state)
does not reach the next. The two leak tests run in this order (pytest keeps a file's order)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from jtok_train.testing import DistributedTestError, run_distributed
from jtok_train.testing.distributed import PRELOAD

pytestmark = pytest.mark.distributed

PROBE = "JTOK_HARNESS_LEAK_PROBE"


def _healthy() -> dict:
    import sys

    import torch
    import torch.distributed as dist

    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return {"sum": t.item(), "world": dist.get_world_size(), "preloaded": all(m in sys.modules for m in PRELOAD)}


def _raise_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")


def _hang_on_rank_one() -> None:
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(3600)


def _die_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.check
def test_a_rank_that_raises_hangs_or_dies_fails_its_call_and_the_next_call_is_healthy():
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed.*ValueError: deliberate failure on rank 1"):
        run_distributed(_raise_on_rank_one, 2, timeout=120)
    assert run_distributed(_healthy, 2) == [{"sum": 3.0, "world": 2, "preloaded": True}] * 2
    with pytest.raises(DistributedTestError, match=r"_hang_on_rank_one: ranks \[(0, )?1\] did not finish within 5 s"):
        run_distributed(_hang_on_rank_one, 2, timeout=5)
    assert run_distributed(_healthy, 2) == [{"sum": 3.0, "world": 2, "preloaded": True}] * 2
    with pytest.raises(DistributedTestError, match=rf"_die_on_rank_one: rank\(s\) died without a result, exit codes "
                                                   rf"\{{1: {-signal.SIGKILL}\}}"):
        run_distributed(_die_on_rank_one, 2, timeout=120)
    assert run_distributed(_healthy, 4) == [{"sum": 10.0, "world": 4, "preloaded": True}] * 4


def _leave_state_behind() -> dict:
    import random
    import threading
    import time

    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from jtok_train.compat import init_model_parallel

    os.environ[PROBE] = "set by the previous test"
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    threading.Thread(target=time.sleep, args=(3600,), daemon=True, name="left-behind").start()
    dist.new_group(ranks=[0])
    init_model_parallel(tp=2, seed=1234)
    return {"env": os.environ.get(PROBE), "mp": ps.model_parallel_is_initialized(),
            "threads": sorted(t.name for t in threading.enumerate()), "torch": torch.initial_seed()}


def _what_a_new_rank_holds() -> dict:
    import random
    import threading

    import numpy as np
    import torch
    from megatron.core import parallel_state as ps

    return {"env": os.environ.get(PROBE), "mp": ps.model_parallel_is_initialized(),
            "threads": sorted(t.name for t in threading.enumerate()), "torch_seed": torch.initial_seed(),
            "random": random.random(), "numpy": float(np.random.random_sample())}


def test_state_left_by_a_call_is_set():
    got = run_distributed(_leave_state_behind, 2)
    for r in got:   # the probe really set each thing, so the next test's "gone" means something
        assert r["env"] and r["mp"] and "left-behind" in r["threads"] and r["torch"] == 1234, r
    assert PROBE not in os.environ    # the ranks' environment is their own


def test_state_left_by_the_previous_call_is_gone():
    import random

    import numpy as np

    seeded_random = random.Random(1234).random()
    seeded_numpy = float(np.random.RandomState(1234).random_sample())
    got = run_distributed(_what_a_new_rank_holds, 2)
    for r in got:
        assert r["env"] is None and not r["mp"] and r["threads"] == ["MainThread"], r
        assert r["torch_seed"] != 1234 and r["random"] != seeded_random and r["numpy"] != seeded_numpy, r
    # every rank draws its own default seeds, as a freshly started process does (not the fork server's state)
    assert got[0]["torch_seed"] != got[1]["torch_seed"] and got[0]["numpy"] != got[1]["numpy"], got


def test_start_command_runs_a_module_as_python_m_does(tmp_path):
    """jtok_train.testing.commands.start_command (the kill-and-resume tests' rank processes): the module runs as
    ``__main__`` with its argv, the given environment and working directory, its stdout and stderr in the log,
    its exit handlers run; exit codes are a fresh interpreter's (sys.exit(c): c, an exception: 1, SIGKILL: -9);
    every start is a new process with its own torch seed (not the server's)."""
    import json

    from jtok_train.testing.commands import start_command

    env = dict(os.environ, JTOK_COMMAND_PROBE="set for this command")
    seen = []
    for mode, args, code in [("exit", ["3"], 3), ("raise", [], 1), ("exit", ["0"], 0)]:
        log = tmp_path / f"{mode}{args}.log"
        p = start_command("tests.distributed.command_probe", [mode, *args], env=env, log=log, cwd=tmp_path)
        assert p.wait(timeout=120) == code, log.read_text()
        text = log.read_text()
        rec = json.loads(text.splitlines()[0])
        assert rec["argv"] == [mode, *args] and rec["name"] == "__main__", rec
        assert rec["cwd"] == str(tmp_path) and rec["probe"] == "set for this command", rec
        assert rec["pid"] == p.pid != os.getpid()
        assert "probe: to stderr" in text and "probe: exit handler ran" in text, text
        if mode == "raise":
            assert "RuntimeError: probe raised" in text, text
        seen.append(rec)
    assert len({r["pid"] for r in seen}) == 3 and len({r["seed"] for r in seen}) == 3, seen
    log = tmp_path / "sleep.log"
    p = start_command("tests.distributed.command_probe", ["sleep"], env=env, log=log, cwd=tmp_path)
    for _ in range(600):                     # until it has started (its first line is in the log)
        if log.exists() and log.read_text():
            break
        time.sleep(0.1)
    assert p.poll() is None, log.read_text()
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert "exit handler ran" not in log.read_text()      # killed: nothing of it ran after the kill
