"""``python -m tests.distributed.command_probe MODE [CODE]``: a command for test_harness's start_command checks.
It prints what it was started with, registers an exit handler, then exits with CODE, raises, or sleeps."""

import atexit
import json
import os
import sys
import time

if __name__ == "__main__":
    mode = sys.argv[1]
    import torch

    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("JTOK_COMMAND_PROBE"),
                      "pid": os.getpid(), "name": __name__, "seed": torch.initial_seed()}), flush=True)
    print("probe: to stderr", file=sys.stderr, flush=True)
    atexit.register(lambda: print("probe: exit handler ran", flush=True))
    if mode == "exit":
        sys.exit(int(sys.argv[2]))
    if mode == "raise":
        raise RuntimeError("probe raised")
    time.sleep(120)
