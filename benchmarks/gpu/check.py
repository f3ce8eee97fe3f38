"""The prepared GPU check: what only a GPU can show, in one short run on one GPU (aim: under 8 minutes on an H200;
GPU time is scarce). From the repository root, with the demo data present (data/demo, `make demo`):

    bash benchmarks/gpu/check.sh                 # on a GPU machine: benchmarks/results/gpu.json
    bash benchmarks/gpu/check.sh --dry-run       # any machine, CPU: every step at toy size (CI runs this)

Steps (each a subprocess; its log in OUT/<step>.log; pass/fail, seconds and figures in the JSON):
1. ``kernels``: the Triton kernel tests compiled for the GPU (kernels/tests, tests/unit/test_kernel_dispatch.py), then
   benchmarks/kernel_bench.py (kernel vs eager and vs the byte floor);
2. ``sanitizer``: a training run (MoE + JTok-M, sharded tables, overlap on, bf16) under PyTorch's CUDA sanitizer
   (TORCH_CUDA_SANITIZER=1: data races between the compute and the exchange's side stream);
3. ``overlap_bitwise``: overlap on vs off, 4 steps each: every weight, table row and optimizer state bitwise
   equal, and the compute's wait on the exchange in each;
4. ``te_vs_local``: the Transformer Engine layer spec against Megatron's local spec, same seed and data, bf16:
   the losses of 3 steps within bf16 tolerance (2%); reported missing where transformer-engine is not installed;
5. ``step_time``: bf16 step time of a moe_1.5b_a250m-shaped model (4 of its 8 layers, 1,024-token sequences)
   without and with JTok-M (sharded tables, overlap), side by side: the ratio is the method's training cost;
6. ``decode``: KV-cache decode with JTok-M tables in host memory vs on the device vs the backbone
   (benchmarks/decode_bench.py).
The exit status is 0 only if every step passed. Written without a GPU to run it on (README: "Written for GPU,
not yet run on one"); the dry run proves the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ["data=demo", "train=demo", "train.save=false", "logging.wandb=false", "train.progress=false"]
JTOKM = ["model=tiny", "jtok=jtokm", "parallel.embedding=sharded", "train.precision=bf16", *BASE]
# the dry run's toy size (plumbing only)
DRY = ["model.hidden_size=64", "model.num_layers=2", "model.ffn_hidden_size=128", "model.num_experts=4",
       "model.moe_ffn_hidden_size=64", "model.moe_shared_expert_intermediate_size=64", "model.seq_length=64",
       "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_samples=4"]
BIG = ["model=moe_1.5b_a250m", "model.num_layers=4", "model.seq_length=1024", "train.micro_batch_size=2",
       "train.global_batch_size=8", "train.precision=bf16", *BASE]

ONE_RUN = r"""
import sys, json
import numpy as np
from jtok_train.config import compose
from jtok_train.testing.state import global_state
from jtok_train.training.trainer import Trainer
args, run, overlap = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
import os
os.makedirs(run, exist_ok=True)
tr = Trainer(compose(args + [f"parallel.overlap={overlap}", f"train.run_dir={run}/overlap_{overlap}"]))
res = tr.fit()
np.savez(f"{run}/overlap_{overlap}.npz", **global_state(tr))
print(json.dumps({"exchange_wait_s_last_step": res.final_metrics.get("exchange/wait_s")}))
"""


def _run(name: str, cmd: list[str], out: Path, env: dict | None = None, timeout: int = 600) -> dict:
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"ok": code == 0, "exit": code, "seconds": round(time.perf_counter() - t0, 1)}


def _last_json(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "step_time_s" in r]


def _step_times(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if "step_time_s" in r][2:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check the plumbing (CI)")
    ap.add_argument("--out", default=None, help="work and log directory (default: a temporary one under /tmp)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--data", nargs=2, metavar=("PREFIX", "TOKENIZER"), default=None,
                    help="train on this indexed dataset and tokenizer instead of data/demo (tests)")
    args = ap.parse_args()
    import torch

    dry = args.dry_run
    small = DRY if dry else []
    out = Path(args.out or f"/tmp/jtok_gpu_check{'_dry' if dry else ''}")
    out.mkdir(parents=True, exist_ok=True)
    if not dry and not torch.cuda.is_available():
        print("gpu check: no CUDA device here: run it on a GPU machine, or --dry-run", file=sys.stderr)
        return 2
    global BASE, JTOKM, BIG
    if args.data is not None:
        data = [f"data.prefixes=[{args.data[0]}]", f"data.tokenizer={args.data[1]}"]
        BASE, JTOKM, BIG = BASE + data, JTOKM + data, BIG + data
    elif not (ROOT / "data" / "demo" / "text_document.idx").is_file():
        print("gpu check: data/demo is missing: build it with `make demo` (or carry it to this machine)", file=sys.stderr)
        return 2
    py = sys.executable
    steps: dict[str, dict] = {}
    info = {"torch": torch.__version__, "dry_run": dry,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}

    # 1. kernels
    kb = [py, "benchmarks/kernel_bench.py", "--check"] if dry else \
        [py, "benchmarks/kernel_bench.py", "--hidden", "2048", "--tokens", "16384", "--iters", "20",
         "--out", str(out / "kernels.json")]
    # (the dry run leaves the kernel tests to `make test`, which runs them under Triton's interpreter)
    s = {"ok": True, "seconds": 0.0} if dry else \
        _run("kernels", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "kernels/tests/test_kernels.py",
                          "tests/unit/test_kernel_dispatch.py"], out)
    s2 = _run("kernels", kb, out)
    steps["kernels"] = {**s, "ok": s["ok"] and s2["ok"], "seconds": s["seconds"] + s2["seconds"],
                        "bench": json.loads((out / "kernels.json").read_text()) if (out / "kernels.json").is_file() else None}

    # 2. the exchange's streams under the CUDA sanitizer (the dry run: the same run without it)
    iters = 1 if dry else 2
    s = _run("sanitizer", [py, "-m", "jtok_train", *JTOKM, *small, f"train.train_iters={iters}",
                           f"train.run_dir={out}/sanitizer"], out, env=None if dry else {"TORCH_CUDA_SANITIZER": "1"})
    races = (out / "sanitizer.log").read_text(errors="replace").count("data race")
    steps["sanitizer"] = {**s, "data_races": races, "ok": s["ok"] and races == 0}

    # 3. overlap on vs off, bitwise. Each run in its own process (two trainings in one process share Megatron's
    #    process-global state), and overlap on twice: the repeat is the noise floor (a GPU kernel that adds in
    #    a varying order makes identical runs differ; on CPU they are bitwise, tests/e2e/test_determinism.py),
    #    so a difference that overlap makes can be told from run-to-run noise. The dry run reports, it does not
    #    judge.
    import numpy as np

    pair, waits, runs_ok, secs = out / "pair", {}, True, 0.0
    pair.mkdir(exist_ok=True)
    for tag, overlap in (("on", "true"), ("on_again", "true"), ("off", "false")):
        r = _run("overlap_bitwise", [py, "-c", ONE_RUN, json.dumps(JTOKM + small + [f"train.train_iters={2 if dry else 4}"]),
                                     str(pair / tag), overlap], out)
        runs_ok, secs = runs_ok and r["ok"], secs + r["seconds"]
        waits[tag] = _last_json(out / "overlap_bitwise.log").get("exchange_wait_s_last_step")
    res: dict = {"exchange_wait_s_last_step": waits}
    if runs_ok:
        st = {tag: np.load(pair / tag / f"overlap_{ov}.npz") for tag, ov in (("on", "true"), ("on_again", "true"),
                                                                            ("off", "false"))}

        def differing(a, b) -> list[str]:
            return sorted(k for k in a.files if k not in b.files or not np.array_equal(a[k], b[k]))

        res["tensors_compared"] = len(st["on"].files)
        res["on_vs_off_differing"] = differing(st["on"], st["off"])
        res["on_vs_on_differing"] = differing(st["on"], st["on_again"])
        res["bitwise_equal"] = not res["on_vs_off_differing"]
    steps["overlap_bitwise"] = {"ok": runs_ok and (dry or bool(res.get("bitwise_equal"))), "seconds": secs, **res}

    # 4. Transformer Engine spec vs the local spec
    try:
        import transformer_engine  # noqa: F401
        have_te = True
    except ImportError:
        have_te = False
    if dry or have_te:
        impl = "local" if dry else "transformer_engine"
        cells = {}
        for name, spec in (("local", "local"), ("te", impl)):
            run = out / f"te_{name}"
            r = _run("te_vs_local", [py, "-m", "jtok_train", "model=tiny", "jtok=jtokm", "train.precision=bf16",
                                     *BASE, *small, f"model.transformer_impl={spec}",
                                     f"train.train_iters={1 if dry else 3}",
                                     f"train.run_dir={run}"], out)
            cells[name] = {**r, "losses": _losses(run) if r["ok"] else None}
        ok = all(c["ok"] for c in cells.values())
        rel = max(abs(a - b) / abs(a) for a, b in zip(cells["local"]["losses"], cells["te"]["losses"])) if ok else None
        steps["te_vs_local"] = {"ok": ok and rel is not None and rel <= 2e-2, "max_rel_loss_diff": rel,
                                "seconds": sum(c["seconds"] for c in cells.values()), "cells": cells}
    else:
        steps["te_vs_local"] = {"ok": False, "missing": "transformer-engine is not installed on this machine"}

    # 5. bf16 step time with and without JTok-M
    big = (["model=tiny", *BASE, *small, "train.precision=bf16"] if dry else BIG) + [f"train.train_iters={3 if dry else 8}"]
    times = {}
    for name, extra in (("backbone", ["jtok=none"]), ("jtokm_sharded", ["jtok=jtokm", "parallel.embedding=sharded"])):
        run = out / f"step_{name}"
        r = _run("step_time", [py, "-m", "jtok_train", *big, *extra, f"train.run_dir={run}"], out, timeout=900)
        times[name] = {**r, "median_step_s": statistics.median(_step_times(run)) if r["ok"] and _step_times(run) else None}
    ok = all(t["ok"] and t["median_step_s"] for t in times.values())
    steps["step_time"] = {"ok": ok, "cells": times, "seconds": sum(t["seconds"] for t in times.values()),
                          "jtokm_vs_backbone": times["jtokm_sharded"]["median_step_s"] / times["backbone"]["median_step_s"]
                          if ok else None}

    # 6. decode: host tables vs device tables vs the backbone
    s = _run("decode", [py, "benchmarks/decode_bench.py", "--configs", "tiny", "--batches", "1", "--repeats",
                        "1" if dry else "3", "--new-tokens", "8" if dry else "64", "--out", str(out / "decode.json")], out)
    steps["decode"] = {**s, "result": json.loads((out / "decode.json").read_text()) if (out / "decode.json").is_file() else None}

    summary = {"info": info, "steps": steps, "all_ok": all(v["ok"] for v in steps.values())}
    if not dry:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(summary, indent=2))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    for name, v in steps.items():
        print(f"{name:16s} {'ok' if v['ok'] else 'FAILED'}  {v.get('seconds', 0):7.1f} s  {v.get('missing', '')}")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
