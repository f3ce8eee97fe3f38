"""The prepared GPU check: what only a GPU can exercise, in one short run (GPU time is scarce; about 5 minutes on
one GPU). Run it on a machine with CUDA, from the repository root, with the demo data present (data/demo):

    python scripts/gpu_check.py --out OUTDIR

1. the Triton kernel tests compiled for the GPU (not the interpreter): tests/unit/test_kernels.py;
2. one training run (MoE + JTok-M, sharded tables, overlap on, bf16) under PyTorch's CUDA sanitizer
   (TORCH_CUDA_SANITIZER=1, which reports data races between streams): the side-stream exchange's hand-offs;
3. overlap on vs off, 4 steps each on the GPU: every weight, table row and optimizer state bitwise equal;
4. the kernel benchmark (benchmarks/kernel_bench.py, small sizes) against eager PyTorch.

Each step's output goes to OUTDIR/<step>.log and a summary to OUTDIR/gpu_check.json (pass/fail, seconds,
figures); the exit status is 0 only if every step passed. Written without a GPU to run it on: see the README's
"Written for GPU, not yet run on one".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["model=tiny", "jtok=jtokm", "data=demo", "train=demo", "parallel.embedding=sharded", "train.save=false",
         "logging.wandb=false", "train.progress=false", "train.precision=bf16"]

OVERLAP_PAIR = r"""
import sys, json
import numpy as np
from jtok_train.config import compose
from jtok_train.testing.state import global_state, compare_states
from jtok_train.training.trainer import Trainer
args = json.loads(sys.argv[1])
states = []
for overlap in ("true", "false"):
    tr = Trainer(compose(args + [f"parallel.overlap={overlap}", f"train.run_dir={sys.argv[2]}/overlap_{overlap}"]))
    tr.fit()
    states.append(global_state(tr))
diffs = compare_states(states[0], states[1], rel=0.0)
print(json.dumps({"tensors_compared": len(diffs), "all_bitwise_equal": all(v == 0.0 for v in diffs.values())}))
"""


def _step(name: str, cmd: list[str], out: Path, env: dict | None = None, timeout: int = 600) -> dict:
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text(errors="replace")
    return {"name": name, "ok": code == 0, "exit": code, "seconds": round(time.perf_counter() - t0, 1),
            "tail": text[-1500:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "gpu_check_out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if not info["cuda"]:
        print("gpu_check: no CUDA device here; this check is for a GPU machine", file=sys.stderr)
        return 2
    if not (ROOT / "data" / "demo" / "text_document.idx").is_file():
        print("gpu_check: data/demo is missing: build it with `make demo` (or carry it to this machine)", file=sys.stderr)
        return 2
    steps = [
        _step("kernels", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/test_kernels.py"], out),
        _step("sanitizer", [py, "-m", "jtok_train", *TRAIN, "train.train_iters=2", f"train.run_dir={out}/sanitizer"],
              out, env={"TORCH_CUDA_SANITIZER": "1"}),
        _step("overlap_bitwise", [py, "-c", OVERLAP_PAIR, json.dumps(TRAIN + ["train.train_iters=4"]), str(out)], out),
        _step("kernel_bench", [py, "benchmarks/kernel_bench.py", "--hidden", "1024", "--tokens", "8192"], out),
    ]
    for s in steps:
        if s["name"] == "sanitizer":   # the sanitizer prints its reports instead of failing the run
            s["data_races"] = (out / "sanitizer.log").read_text(errors="replace").count("data race")
            s["ok"] = s["ok"] and s["data_races"] == 0
        if s["name"] == "overlap_bitwise" and s["ok"]:
            res = json.loads(s["tail"].strip().splitlines()[-1])
            s.update(res)
            s["ok"] = bool(res["all_bitwise_equal"])
    summary = {"info": info, "steps": steps, "all_ok": all(s["ok"] for s in steps)}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    for s in steps:
        print(f"{s['name']:16s} {'ok' if s['ok'] else 'FAILED'}  {s['seconds']:7.1f} s")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
