"""The prepared GPU check: what only a GPU can show, in one short run on one GPU (every step has a time budget,
all of them 7.5 minutes: GPU time is scarce). From the repository root:

    bash benchmarks/gpu/prepare.sh               # a CPU machine first: wheels, data/demo, size, carry list
    bash benchmarks/gpu/check.sh --out $OUT      # the GPU machine as it comes: OUT/gpu_check.json, OUT/<step>.log
    bash benchmarks/gpu/check.sh --dry-run       # any machine, CPU: every step at toy size (CI runs this)

Steps (each a subprocess; its log in OUT/<step>.log; pass/fail, seconds and figures in the JSON):
1. ``kernels``: the Triton kernel tests compiled for the GPU (kernels/tests, tests/unit/test_kernel_dispatch.py; the
   dry run only collects them: `make test` runs them under Triton's interpreter), then benchmarks/kernel_bench.py
   (kernel vs eager and vs the byte floor);
2. ``sanitizer``: a training run (MoE + JTok-M, sharded tables, overlap on, bf16) under PyTorch's CUDA sanitizer
   (TORCH_CUDA_SANITIZER=1: data races between the compute and the exchange's side stream);
3. ``overlap_bitwise``: overlap on vs off (and on again: the noise floor), 4 steps each: every weight, table row
   and optimizer state bitwise equal, and the compute's wait on the exchange (the exposed exchange time) in each;
4. ``te_vs_local``: the Transformer Engine layer spec against Megatron's local spec, same seed and data, bf16:
   the losses of 3 steps within bf16 tolerance (2%); "available": false where transformer-engine is not installed
   (the GPU image), which is no failure;
5. ``step_time``: bf16 step time of a moe_1.5b_a250m-shaped model (4 of its 8 layers, 1,024-token sequences)
   without and with JTok-M (sharded tables, overlap), side by side: the ratio is the method's training cost;
6. ``decode``: KV-cache decode with JTok-M tables in host memory vs on the device vs the backbone
   (benchmarks/decode_bench.py).
The exit status is 0 only if every step passed; a step that cannot run here (Transformer Engine is not in the GPU
image and too large to carry) reports "available": false and does not fail. The JSON is rewritten after every
step, so a run cut short still leaves what it measured.

What one GPU shows and what it cannot (also in the JSON, info.one_gpu): two ranks cannot share one GPU under NCCL,
so every training here is one rank, an NCCL world of one, with sharded tables (an embedding-parallel group of one)
and overlap on. The exchange then runs on its CUDA side stream as with many ranks: the plan, the counts and ids
over the host (gloo) group, the row gather, NCCL's all-to-all (a copy to itself), every wait_stream,
record_stream and hand-off between the side stream and the compute stream, and the deferred row send after the
forward is enqueued. So the sanitizer sees the real stream discipline and the bitwise check compares real
side-stream schedules with the serial one. Left for a machine with several GPUs: the all-to-all's traffic between
GPUs (NVLink, InfiniBand) and how much of it the overlap hides (the exposed exchange time here is the floor of a
self-copy), dedup's saving in bytes across ranks, the hot rows' all-reduce, and EP/TP/PP above 1 on NCCL (the
test suite runs all of these on gloo, on CPU). Two ranks over gloo with CUDA tensors would add a real two-party
exchange, but gloo stages CUDA all-to-alls through host memory, so it would time the staging, not the overlap.
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
from jtok_train.training.trainer import build_trainer
args, run, overlap = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
import os
os.makedirs(run, exist_ok=True)
tr = build_trainer(compose(args + [f"parallel.overlap={overlap}", f"train.run_dir={run}/overlap_{overlap}"]))
res = tr.fit()
np.savez(f"{run}/overlap_{overlap}.npz", **global_state(tr))
print(json.dumps({"exchange_wait_s_last_step": res.final_metrics.get("exchange/wait_s")}))
"""


# Time budgets, seconds on the GPU (the dry run on CPU gets DRY_SCALE times each): a step's runs share its
# budget, a run past it is killed and fails the step, and no run starts past TOTAL_S, so check.sh ends within
# 8 minutes with the wheels installed (a few seconds) and every process's start counted.
TOTAL_S = 450
BUDGET_S = {"kernels": 120, "sanitizer": 60, "overlap_bitwise": 90, "te_vs_local": 60, "step_time": 120, "decode": 60}
DRY_SCALE = 4

ONE_GPU = {
    "ranks": "one: two ranks cannot share one GPU under NCCL",
    "exercised": "sharded tables with an embedding-parallel group of one (an NCCL world of one) and overlap on: the "
                 "exchange runs on its CUDA side stream as with many ranks (counts and ids over the host group, the "
                 "row gather, NCCL's all-to-all as a self-copy, every wait_stream, record_stream and hand-off), under "
                 "the CUDA sanitizer and in the bitwise overlap on/off comparison",
    "left_for_several_gpus": "all-to-all traffic between GPUs and how much of it overlap hides (the exposed exchange "
                             "time here is a self-copy's), dedup's byte saving across ranks, the hot rows' all-reduce, "
                             "EP/TP/PP above 1 on NCCL (the test suite runs these on gloo, on CPU)",
}


class Clock:
    """The run's deadline and each step's budget."""

    def __init__(self, scale: float):
        self.scale, self.t0 = scale, time.perf_counter()

    def left(self) -> float:
        return TOTAL_S * self.scale - (time.perf_counter() - self.t0)

    def timeout(self, step: str) -> float:
        return min(BUDGET_S[step] * self.scale, self.left())


def _run(name: str, cmd: list[str], out: Path, timeout: float, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        if timeout < 5:
            f.write("not started: the check's time is spent\n")
            return {"ok": False, "exit": "no time left", "seconds": 0.0}
        try:
            code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:.0f} s"
            f.write(f"\n{code}\n")
    return {"ok": code == 0, "exit": code, "seconds": round(time.perf_counter() - t0, 1)}


def _last_json(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def _metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _metrics(run_dir) if "loss" in r and "step_time_s" in r]


def _step_times(run_dir: Path) -> list[float]:
    return [r["step_time_s"] for r in _metrics(run_dir) if "step_time_s" in r][2:]


def _versions() -> dict:
    from importlib import metadata

    v = {"python": sys.version.split()[0]}
    for dist in ("torch", "triton", "megatron-core", "hydra-core", "omegaconf", "numpy", "transformers"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    return v


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
    clock = Clock(DRY_SCALE if dry else 1)
    out = Path(args.out or f"/tmp/jtok_gpu_check{'_dry' if dry else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not dry and not torch.cuda.is_available():
        print("gpu check: no CUDA device here: run it on a GPU machine, or --dry-run", file=sys.stderr)
        return 2
    global BASE, JTOKM, BIG
    if args.data is not None:
        data = [f"data.prefixes=[{args.data[0]}]", f"data.tokenizer={args.data[1]}"]
        BASE, JTOKM, BIG = BASE + data, JTOKM + data, BIG + data
    elif not (ROOT / "data" / "demo" / "text_document.idx").is_file():
        print("gpu check: data/demo is missing: build it with `bash benchmarks/gpu/prepare.sh` (or `make demo`) and "
              "carry it to this machine (the run tool's carry list names data/demo)", file=sys.stderr)
        return 2
    py = sys.executable
    steps: dict[str, dict] = {}
    info = {**_versions(), "dry_run": dry,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "carried_wheels": [w for w in os.environ.get("JTOK_GPU_CHECK_WHEELS", "").split(",") if w],
            "budget_s": {"total": TOTAL_S * clock.scale, **{k: v * clock.scale for k, v in BUDGET_S.items()}},
            "one_gpu": ONE_GPU}

    def save(final: bool = False) -> dict:
        summary = {"info": info, "steps": steps, "all_ok": all(v["ok"] for v in steps.values()),
                   "complete": final, "seconds": round(time.perf_counter() - clock.t0, 1)}
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        return summary

    # 1. kernels
    kb = [py, "benchmarks/kernel_bench.py", "--check"] if dry else \
        [py, "benchmarks/kernel_bench.py", "--hidden", "2048", "--tokens", "16384", "--iters", "20",
         "--out", str(out / "kernels.json")]
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "kernels/tests/test_kernels.py",
             "tests/unit/test_kernel_dispatch.py"]
    # the dry run collects the tests (their imports, the project's pytest plugins); `make test` runs them under
    # Triton's interpreter
    budget = BUDGET_S["kernels"] * clock.scale
    s = _run("kernels", tests + (["--collect-only"] if dry else []), out, min(0.6 * budget, clock.left()))
    s2 = _run("kernels", kb, out, min(budget - s["seconds"], clock.left()))
    steps["kernels"] = {**s, "ok": s["ok"] and s2["ok"], "seconds": s["seconds"] + s2["seconds"],
                        "bench": json.loads((out / "kernels.json").read_text()) if (out / "kernels.json").is_file() else None}
    save()

    # 2. the exchange's streams under the CUDA sanitizer (the dry run: the same run without it)
    iters = 1 if dry else 2
    s = _run("sanitizer", [py, "-m", "jtok_train", *JTOKM, *small, f"train.train_iters={iters}",
                           f"train.run_dir={out}/sanitizer"], out, clock.timeout("sanitizer"),
             env=None if dry else {"TORCH_CUDA_SANITIZER": "1"})
    races = (out / "sanitizer.log").read_text(errors="replace").count("data race")
    steps["sanitizer"] = {**s, "data_races": races, "ok": s["ok"] and races == 0,
                          "sanitized": not dry}
    save()

    # 3. overlap on vs off, bitwise. Each run in its own process (two trainings in one process share Megatron's
    #    process-global state), and overlap on twice: the repeat is the noise floor (a GPU kernel that adds in
    #    a varying order makes identical runs differ; on CPU they are bitwise, tests/e2e/test_determinism.py),
    #    so a difference that overlap makes can be told from run-to-run noise. The dry run reports, it does not
    #    judge.
    import numpy as np

    pair, waits, runs_ok, secs = out / "pair", {}, True, 0.0
    pair.mkdir(exist_ok=True)
    # (the dry run, on CPU where the repeat is bitwise anyway, leaves the repeat out)
    runs = (("on", "true"), ("off", "false")) if dry else (("on", "true"), ("on_again", "true"), ("off", "false"))
    for i, (tag, overlap) in enumerate(runs):
        budget = min(clock.left(), BUDGET_S["overlap_bitwise"] * clock.scale - secs) / (len(runs) - i)
        r = _run("overlap_bitwise", [py, "-c", ONE_RUN, json.dumps(JTOKM + small + [f"train.train_iters={2 if dry else 4}"]),
                                     str(pair / tag), overlap], out, budget)
        runs_ok, secs = runs_ok and r["ok"], secs + r["seconds"]
        waits[tag] = _last_json(out / "overlap_bitwise.log").get("exchange_wait_s_last_step") if r["ok"] else None
    res: dict = {"exchange_wait_s_last_step": waits}
    if runs_ok:
        st = {tag: np.load(pair / tag / f"overlap_{ov}.npz") for tag, ov in runs}

        def differing(a, b) -> list[str]:
            return sorted(k for k in a.files if k not in b.files or not np.array_equal(a[k], b[k]))

        res["tensors_compared"] = len(st["on"].files)
        res["on_vs_off_differing"] = differing(st["on"], st["off"])
        res["on_vs_on_differing"] = differing(st["on"], st["on_again"]) if "on_again" in st else None
        res["bitwise_equal"] = not res["on_vs_off_differing"]
    steps["overlap_bitwise"] = {"ok": runs_ok and (dry or bool(res.get("bitwise_equal"))), "seconds": round(secs, 1),
                                **res}
    save()

    # 4. Transformer Engine spec vs the local spec: TE is not in the GPU image and too large to carry (a step
    #    that reports "available": false passes). The dry run follows the same rule (where TE is installed it
    #    compares local with local: plumbing)
    try:
        import transformer_engine  # noqa: F401
        have_te = True
    except ImportError:
        have_te = False
    if have_te:
        impl = "local" if dry else "transformer_engine"
        cells, secs = {}, 0.0
        for i, (name, spec) in enumerate((("local", "local"), ("te", impl))):
            run = out / f"te_{name}"
            budget = min(clock.left(), BUDGET_S["te_vs_local"] * clock.scale - secs) / (2 - i)
            r = _run("te_vs_local", [py, "-m", "jtok_train", "model=tiny", "jtok=jtokm", "train.precision=bf16",
                                     *BASE, *small, f"model.transformer_impl={spec}",
                                     f"train.train_iters={1 if dry else 3}",
                                     f"train.run_dir={run}"], out, budget)
            secs += r["seconds"]
            cells[name] = {**r, "losses": _losses(run) if r["ok"] else None}
        ok = all(c["ok"] and c["losses"] for c in cells.values())
        rel = max(abs(a - b) / abs(a) for a, b in zip(cells["local"]["losses"], cells["te"]["losses"])) if ok else None
        steps["te_vs_local"] = {"ok": ok and rel is not None and rel <= 2e-2, "available": True,
                                "max_rel_loss_diff": rel, "seconds": round(secs, 1), "cells": cells}
    else:
        steps["te_vs_local"] = {"ok": True, "available": False, "seconds": 0.0,
                                "note": "not available: transformer-engine is not installed on this machine (not in "
                                        "the GPU image, too large to carry); a GPU image with it runs this step"}
    save()

    # 5. bf16 step time with and without JTok-M
    big = (["model=tiny", *BASE, *small, "train.precision=bf16"] if dry else BIG) + [f"train.train_iters={3 if dry else 8}"]
    times, secs = {}, 0.0
    for i, (name, extra) in enumerate((("backbone", ["jtok=none"]),
                                       ("jtokm_sharded", ["jtok=jtokm", "parallel.embedding=sharded"]))):
        run = out / f"step_{name}"
        budget = min(clock.left(), BUDGET_S["step_time"] * clock.scale - secs) / (2 - i)
        r = _run("step_time", [py, "-m", "jtok_train", *big, *extra, f"train.run_dir={run}"], out, budget)
        secs += r["seconds"]
        st = _step_times(run) if r["ok"] else []
        times[name] = {**r, "median_step_s": statistics.median(st) if st else None}
    ok = all(t["ok"] and t["median_step_s"] for t in times.values())
    steps["step_time"] = {"ok": ok, "cells": times, "seconds": round(secs, 1),
                          "jtokm_vs_backbone": times["jtokm_sharded"]["median_step_s"] / times["backbone"]["median_step_s"]
                          if ok else None}
    save()

    # 6. decode: host tables vs device tables vs the backbone
    s = _run("decode", [py, "benchmarks/decode_bench.py", "--configs", "tiny", "--batches", "1", "--repeats",
                        "1" if dry else "3", "--new-tokens", "8" if dry else "64", "--out", str(out / "decode.json")],
             out, clock.timeout("decode"))
    steps["decode"] = {**s, "result": json.loads((out / "decode.json").read_text()) if (out / "decode.json").is_file() else None}

    summary = save(final=True)
    if not dry:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(summary, indent=2))
    for name, v in steps.items():
        note = "not available" if v.get("available") is False else ""
        print(f"{name:16s} {'ok' if v['ok'] else 'FAILED'}  {v.get('seconds', 0):7.1f} s  {note}")
    print(f"gpu check: {summary['seconds']:.0f} s; JSON and logs in {out}")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
