"""A small iso-FLOP quality study on the demo corpus, on CPU: the MoE backbone alone vs + JTok vs + JTok-M.

    .venv/bin/python benchmarks/quality/study.py run [--only isoflop|eta] [--max-minutes N] [--dry-run]
    .venv/bin/python benchmarks/quality/study.py analyze   # fits -> benchmarks/results/quality.json + summary.md
    .venv/bin/python benchmarks/quality/study.py plot      # PNGs -> benchmarks/quality/plots/

Method (PAPER.md, "Iso-FLOPs"): for each compute budget C, several backbone widths N; each run trains for
D = C / flops_per_token tokens (FLOPs from jtok_train.planning.formulas) and reports its final validation loss
on a fixed held-out set (the same sequences for every run and seed). A quadratic fit of each budget's U-curve
(loss vs log N_c) gives the budget's optimum; the frontier is a linear fit of log L_opt vs log C per variant;
see analysis.py. A second group sweeps the JTok-M table size (eta) at a fixed backbone and fixed tokens.

Resumable: one directory per run under --runs (default benchmarks/quality/runs/, git-ignored); a run whose
directory holds result.json is skipped. Runs execute one at a time, in a child process with one thread, in
grid order (see grid()). Each finished run's record (the shared
run-record format of the scaling analysis) is written atomically to <run>/result.json; `analyze` gathers them
into benchmarks/quality/results.jsonl (the committed copy, from which analyze and plot work without the runs).

Needs the demo data: `jtok-data build --source python-docs --out data/demo --vocab-size 4096` (launch/demo.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

DEFAULT_RUNS = HERE / "runs"
RESULTS_JSONL = HERE / "results.jsonl"
RESULTS_JSON = ROOT / "benchmarks" / "results" / "quality.json"
SUMMARY_MD = HERE / "summary.md"
PLOTS = HERE / "plots"

# -- the grid ----------------------------------------------------------------------------------------
SEQ = 128            # tokens per sequence
GBS = 16             # sequences per optimizer step (one micro-batch): 2,048 tokens per step
EVAL_SAMPLES = 128   # validation sequences, the same for every run (see _fixed_valid)
EVAL_SEED = 1234     # the shuffle seed of the validation set (independent of the training seed)
LR, MIN_LR = 2.0e-3, 2.0e-4   # the CPU demo's peak LR; WSD (5% warmup, 20% linear decay) to 10%
SEEDS = (1, 2)
VARIANTS = ("none", "jtok", "jtokm")
WIDTHS = (16, 32, 64)        # backbone widths d (4 layers, 8 experts top-2, 1 shared expert)
REF_WIDTH = 32               # budgets are named by the steps this width gets ...
BUDGET_STEPS = (54, 108, 216)  # ... at these counts (3 budgets, a factor 2 apart)
ETA_WIDTH = 32
ETA_STEPS = 108
# (n_e, K, seeds): rho = K/n_e = 0.25 fixed (the paper's table-scaling study), 2 seeds; and K = 2 fixed with
# n_e 4 / 8 / 16 (K = 1 gives the router no gradient from the loss: its one weight is renormalised to 1)
ETA_SETS = ((4, 1, (1, 2)), (8, 2, (1, 2)), (16, 4, (1, 2)), (4, 2, (1,)), (16, 2, (1,)))
# Settings of the token tables on top of jtok_train/configs/jtok/*.yaml (empty: the configs' defaults). See the README
# section of the study for the pilot that chose them.
# JTok: the configs' defaults since the pilot below chose them (the runs before it used table_init_std 0.02 and
# scale_init 0: their records are in the git history of results.jsonl).
VARIANT_OVERRIDES: dict[str, list[str]] = {"none": [], "jtok": [], "jtokm": ["jtok.table_init_std=0.02"]}

# Pilot of static JTok's init (issue: static JTok barely helps), one factor at a time around the defaults, on a
# MoE and a dense backbone at d = 32 for 216 steps (442k tokens, the iso-FLOP top budget of that width):
#   A: scale_init in PILOT_SCALES (table std 0.02, s at the model's LR);
#   B: table_init_std in PILOT_STDS at scale_init PILOT_SCALE (A's best);
#   C: s with its own LR (jtok.scale_lr_mult = PILOT_SCALE_LR) at scale_init 0 and PILOT_SCALE;
#   D: A, B and C put their best at the grid's edge (scale_init 1, std 0.005, scale_lr_mult 10): one step
#      beyond each, and the two helpful changes together (PILOT_EDGE).
PILOT_WIDTH, PILOT_STEPS = 32, 216
PILOT_BACKBONES = ("moe", "dense")
PILOT_SCALES = (0.0, 0.1, 0.5, 1.0)
PILOT_SCALE = 1.0
PILOT_STDS = (0.005, 0.1)
PILOT_SCALE_LR = 10.0
PILOT_EDGE = ((2.0, 0.02, 1.0), (1.0, 0.02, 30.0), (1.0, 0.005, 10.0))

# Table-size sweep with trained rows: the d = 16 MoE (the iso-FLOP optimum's width) for TABLE_STEPS steps
# (2.1M tokens, 0.69 epochs of the training split), JTok-M at rho = 0.25 with n_e = 8 ... 64 (K = 2 ... 16;
# K = 1 would leave the router without a gradient from the loss). At these tokens the median token id occurs
# ~148 times, so each of its n_e rows is selected ~37 times (rho of its occurrences); the old sweep (108 steps)
# gave 4. See BENCHMARKS.md for the figures.
TABLE_WIDTH, TABLE_STEPS = 16, 1024
TABLE_SETS = ((8, 2), (16, 4), (32, 8), (64, 16))

# The CPU demo's recipe (model=tiny train=demo: d 128, 150 steps of 16 x 256 tokens) on one process.
DEMO_STEPS = 150


def model_overrides(d: int) -> list[str]:
    """The tiny MoE of jtok_train/configs/model/tiny.yaml at width d: the FFN widths scale with d as in tiny.yaml."""
    return [
        "model=tiny",
        f"model.hidden_size={d}",
        f"model.ffn_hidden_size={4 * d}",
        f"model.moe_ffn_hidden_size={2 * d}",
        f"model.moe_shared_expert_intermediate_size={2 * d}",
        f"model.seq_length={SEQ}",
    ]


def dense_overrides(d: int) -> list[str]:
    """jtok_train/configs/model/tiny_dense.yaml (the demo's dense twin) at width d."""
    return ["model=tiny_dense", f"model.hidden_size={d}", f"model.ffn_hidden_size={4 * d}", f"model.seq_length={SEQ}"]


def train_overrides(steps: int, seed: int, run_dir: Path, demo: bool = False) -> list[str]:
    batch = [] if demo else [f"train.micro_batch_size={GBS}", f"train.global_batch_size={GBS}"]
    return [
        "train=demo",
        *batch,
        f"train.train_iters={steps}",
        f"train.lr={LR}",
        f"train.min_lr={MIN_LR}",
        "train.lr_schedule=wsd",
        "train.warmup_fraction=0.05",
        "train.wsd_decay_fraction=0.2",
        f"train.eval_samples={EVAL_SAMPLES}",
        f"train.seed={seed}",
        "train.threads=1",
        "train.progress=false",
        "train.save=false",
        "train.auto_resume=false",
        "logging.wandb=false",
        f"train.run_dir={run_dir}",
    ]


def jtok_overrides(variant: str, num_sets: int | None = None, top_k: int | None = None, seed: int = 1) -> list[str]:
    o = [f"jtok={variant}"] + list(VARIANT_OVERRIDES[variant])
    if variant != "none":
        o.append(f"jtok.table_seed={1000 + seed}")   # a seed is a new draw of every random init
    if num_sets is not None:
        o += [f"jtok.num_sets={num_sets}", f"jtok.top_k={top_k}"]
    return o


def _compose(overrides: list[str]):
    from jtok_train.config import compose

    return compose(overrides)


def _accounting(overrides: list[str]) -> dict:
    from jtok_train.planning.formulas import flops_per_token, formula_params

    cfg = _compose(overrides)
    counts = formula_params(cfg)
    return {"active_params": counts.active_params, "token_params": counts.token_params,
            "flops_per_token": flops_per_token(cfg, counts)}


def budgets() -> list[float]:
    """The compute budgets C (training FLOPs): the backbone alone at REF_WIDTH for BUDGET_STEPS steps."""
    fpt = _accounting(model_overrides(REF_WIDTH) + ["jtok=none"])["flops_per_token"]
    return [fpt * s * GBS * SEQ for s in BUDGET_STEPS]


def grid(runs_dir: Path, only: str | None = None) -> list[dict]:
    """Every run of the study, in execution order: the iso-FLOP runs of the first seed, the eta sweep, then
    the other seeds; within a seed the backbone, JTok-M, then JTok, budget by budget. A partial study thus
    has whole U-curves of one seed first, and the comparison that matters most (JTok-M) before JTok."""
    iso: dict[int, list[dict]] = {}
    if only in (None, "isoflop"):
        cs = budgets()
        for seed in SEEDS:
            iso[seed] = []
            for variant in ("none", "jtokm", "jtok"):
                for bi, c in enumerate(cs):
                    for d in WIDTHS:
                        jo = jtok_overrides(variant, seed=seed)
                        acc = _accounting(model_overrides(d) + jo)
                        steps = max(1, round(c / (acc["flops_per_token"] * GBS * SEQ)))
                        name = f"iso_b{bi}_{variant}_d{d}_s{seed}"
                        iso[seed].append({"name": name, "group": "isoflop", "variant": variant, "seed": seed,
                                          "hidden_size": d, "budget": c, "budget_index": bi, "steps": steps,
                                          "overrides": model_overrides(d) + jo})
    eta: list[dict] = []
    if only in (None, "eta"):
        for ne, k, eta_seeds in ETA_SETS:
            for seed in eta_seeds:
                name = f"eta_ne{ne}_k{k}_d{ETA_WIDTH}_s{seed}"
                eta.append({"name": name, "group": "eta_sweep", "variant": "jtokm", "seed": seed,
                            "hidden_size": ETA_WIDTH, "budget": None, "steps": ETA_STEPS,
                            "overrides": model_overrides(ETA_WIDTH) + jtok_overrides("jtokm", ne, k, seed)})
    seeds = sorted(iso)
    specs = (iso[seeds[0]] if seeds else []) + eta + [s for seed in seeds[1:] for s in iso[seed]]
    if only in (None, "pilot"):
        specs += pilot_specs()
    if only in (None, "table"):
        specs += table_specs()
    if only in (None, "demo"):
        specs += demo_specs()
    for s in specs:
        s["run_dir"] = str(runs_dir / s["name"])
        s["overrides"] = s["overrides"] + train_overrides(s["steps"], s["seed"], Path(s["run_dir"]),
                                                          demo=s["group"] == "demo")
    return specs


def _pilot_settings() -> list[tuple[float, float, float]]:
    """(scale_init, table_init_std, scale_lr_mult) of the pilot's JTok runs, parts A, B, C (see above)."""
    out = [(si, 0.02, 1.0) for si in PILOT_SCALES]
    out += [(PILOT_SCALE, std, 1.0) for std in PILOT_STDS]
    out += [(si, 0.02, PILOT_SCALE_LR) for si in sorted({0.0, PILOT_SCALE})]
    out += list(PILOT_EDGE)
    return list(dict.fromkeys(out))


def pilot_specs() -> list[dict]:
    specs = []
    for seed in SEEDS:
        for bb in PILOT_BACKBONES:
            mo = (model_overrides if bb == "moe" else dense_overrides)(PILOT_WIDTH)
            base = {"group": "pilot", "seed": seed, "hidden_size": PILOT_WIDTH, "budget": None,
                    "steps": PILOT_STEPS, "backbone": bb}
            specs.append({**base, "name": f"pilot_{bb}_none_s{seed}", "variant": "none", "overrides": mo + ["jtok=none"]})
            for si, std, slr in _pilot_settings():
                jo = ["jtok=jtok", f"jtok.table_seed={1000 + seed}", f"jtok.scale_init={si}",
                      f"jtok.table_init_std={std}", f"jtok.scale_lr_mult={slr}"]
                specs.append({**base, "name": f"pilot_{bb}_jtok_si{si:g}_std{std:g}_slr{slr:g}_s{seed}",
                              "variant": "jtok", "overrides": mo + jo,
                              "setting": {"scale_init": si, "table_init_std": std, "scale_lr_mult": slr}})
    return specs


def table_specs() -> list[dict]:
    specs = []
    for seed in SEEDS:
        base = {"group": "table_sweep", "seed": seed, "hidden_size": TABLE_WIDTH, "budget": None, "steps": TABLE_STEPS}
        specs.append({**base, "name": f"table_none_d{TABLE_WIDTH}_s{seed}", "variant": "none",
                      "overrides": model_overrides(TABLE_WIDTH) + jtok_overrides("none", seed=seed)})
        for ne, k in TABLE_SETS:
            specs.append({**base, "name": f"table_ne{ne}_k{k}_d{TABLE_WIDTH}_s{seed}", "variant": "jtokm",
                          "overrides": model_overrides(TABLE_WIDTH) + jtok_overrides("jtokm", ne, k, seed)})
    return specs


def demo_specs() -> list[dict]:
    """The demo recipe with the configs' defaults (no study overrides: what a user gets)."""
    specs = []
    for seed in SEEDS:
        for variant in VARIANTS:
            jo = [f"jtok={variant}"] + ([f"jtok.table_seed={1000 + seed}"] if variant != "none" else [])
            specs.append({"group": "demo", "seed": seed, "hidden_size": 128, "budget": None, "steps": DEMO_STEPS,
                          "name": f"demo_{variant}_s{seed}", "variant": variant, "overrides": ["model=tiny"] + jo})
    return specs


# -- one run (in the worker process) -------------------------------------------------------------------
_VALID_CACHE: dict = {}


def _fixed_valid(trainer):
    """The validation set shuffled with EVAL_SEED whatever the training seed, so every run and seed is
    scored on the same EVAL_SAMPLES sequences (the split by documents does not depend on the seed)."""
    from jtok_train.data.datasets import build_datasets

    key = (tuple(trainer.cfg.data.prefixes), trainer.cfg.model.seq_length)
    if key not in _VALID_CACHE:
        _, valid = build_datasets(list(trainer.cfg.data.prefixes), trainer.tokenizer,
                                  seq_length=trainer.cfg.model.seq_length, seed=EVAL_SEED, train_samples=1,
                                  valid_samples=EVAL_SAMPLES, split=trainer.cfg.data.split,
                                  cache_dir=trainer.cfg.data.cache_dir)
        if valid is None:
            raise SystemExit(f"the data split {trainer.cfg.data.split!r} gives no validation documents: "
                             "use a split with a validation part, e.g. data.split='98,2,0'")
        _VALID_CACHE[key] = valid
    return _VALID_CACHE[key]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run_one(spec: dict) -> dict:
    import shutil

    import torch

    from jtok_train.planning.formulas import flops_per_token, formula_params
    from jtok_train.training.trainer import build_trainer

    torch.set_num_threads(1)
    run_dir = Path(spec["run_dir"])
    if run_dir.exists():              # an interrupted earlier attempt: start it over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = _compose(spec["overrides"])
    t0 = time.perf_counter()
    trainer = build_trainer(cfg)
    trainer.valid_ds = _fixed_valid(trainer)
    res = trainer.fit()
    wall = time.perf_counter() - t0
    counts = formula_params(cfg)
    fpt = flops_per_token(cfg, counts)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:] or [res.wall_s / max(1, res.steps)]
    j, t = cfg.jtok, cfg.train
    tokens = t.train_iters * t.global_batch_size * cfg.model.seq_length
    rec = {
        "name": spec["name"], "group": spec["group"], "variant": j.variant, "seed": int(t.seed),
        "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
        "active_params": counts.active_params, "token_params": counts.token_params,
        "eta": counts.token_params / counts.active_params,
        "rho": (j.top_k / j.num_sets) if j.variant != "none" else 0.0,
        "num_sets": int(j.num_sets) if j.variant != "none" else 0,
        "top_k": int(j.top_k) if j.variant != "none" else 0,
        "flops_per_token": fpt, "tokens": tokens, "compute": fpt * tokens,
        "val_loss": float(res.valid_loss), "train_loss": float(res.losses[-1]),
        "wall_s": wall, "step_time_s": statistics.median(step_times),
        "budget": spec["budget"], "budget_index": spec.get("budget_index"), "steps": int(t.train_iters),
        "seq_length": cfg.model.seq_length, "global_batch_size": t.global_batch_size, "lr": t.lr,
        "eval_samples": EVAL_SAMPLES, "train_losses": [round(x, 4) for x in res.losses],
        "backbone": spec.get("backbone", "moe"),
        "jtok_init": ({"scale_init": float(j.scale_init), "table_init_std": float(j.table_init_std),
                       "scale_lr_mult": float(j.scale_lr_mult)} if j.variant != "none" else None),
    }
    _write_json(run_dir / "result.json", rec)
    return rec


def worker(spec_file: str, deadline: float) -> None:
    """Run the specs of ``spec_file`` one after the other in this process (one Megatron state, rebuilt per
    run by the Trainer); stop starting new runs after ``deadline`` (epoch seconds)."""
    import warnings

    from jtok_train.compat import init_distributed

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)
    init_distributed()
    specs = json.loads(Path(spec_file).read_text())
    for spec in specs:
        if (Path(spec["run_dir"]) / "result.json").is_file():
            continue
        if time.time() > deadline:
            print("study: time is up, the remaining runs are left for the next `run`", flush=True)
            return
        print(f"study: {spec['name']} ({spec['steps']} steps)", flush=True)
        rec = run_one(spec)
        print(f"study: {spec['name']} val_loss {rec['val_loss']:.4f} in {rec['wall_s']:.0f}s", flush=True)


def cmd_run(args) -> None:
    runs_dir = Path(args.runs)
    global WIDTHS
    if args.widths:
        WIDTHS = tuple(int(w) for w in args.widths.split(","))
    specs = grid(runs_dir, args.only)
    if args.filter:
        import re

        specs = [s for s in specs if re.search(args.filter, s["name"])]
    for s in specs:
        s["overrides"] += list(args.extra or [])
    todo = [s for s in specs if not (Path(s["run_dir"]) / "result.json").is_file()]
    print(f"study: {len(specs)} runs in the grid, {len(specs) - len(todo)} done, {len(todo)} to run", flush=True)
    if args.dry_run:
        for s in todo:
            print(f"  {s['name']}: {s['steps']} steps, budget {s['budget']}")
        return
    if not todo:
        return
    data = ROOT / "data" / "demo" / "text_document.bin"
    if not data.is_file():
        raise SystemExit(f"{data} not found: build the demo data first with "
                         "`jtok-data build --source python-docs --out data/demo --vocab-size 4096`")
    runs_dir.mkdir(parents=True, exist_ok=True)
    spec_file = runs_dir / "pending.json"
    _write_json(spec_file, todo)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    jobs = max(1, min(args.jobs, len(todo)))
    # each worker takes every jobs-th run (one thread each: --jobs up to the cores; losses do not depend on it)
    files = [spec_file] if jobs == 1 else []
    if jobs > 1:
        for i in range(jobs):
            files.append(runs_dir / f"pending_{i}.json")
            _write_json(files[-1], todo[i::jobs])

    def attempt_all(f: Path) -> int:
        for attempt in range(3):    # a crashed worker is restarted; finished runs are skipped
            rc = subprocess.call([sys.executable, __file__, "_worker", str(f), str(deadline)], env=env, cwd=ROOT)
            if rc == 0:
                return 0
            print(f"study: the worker of {f.name} exited with {rc} (attempt {attempt + 1})", flush=True)
        return rc

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        rcs = list(pool.map(attempt_all, files))
    if any(rcs):
        raise SystemExit("study: a worker failed 3 times; see the log above")


# -- records ---------------------------------------------------------------------------------------------
def load_records(source: Path | None = None, recursive: bool = True) -> list[dict]:
    """Run records from result.json files under a directory (recursively, or only its direct sub-directories)
    or from a .jsonl file; the last record of a name wins."""
    source = Path(source) if source is not None else RESULTS_JSONL
    recs: list[dict] = []
    if source.is_dir():
        files = source.rglob("result.json") if recursive else source.glob("*/result.json")
        recs = [json.loads(p.read_text()) for p in sorted(files)]
    elif source.is_file():
        recs = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    else:
        raise SystemExit(f"no run records at {source}: run `study.py run` first")
    by_name = {r["name"]: r for r in recs}
    return list(by_name.values())


def _records_for(args) -> list[dict]:
    """--records if given; else the study directory's runs (refreshing results.jsonl, the committed copy),
    else results.jsonl."""
    if args.records:
        return load_records(Path(args.records))
    if any(DEFAULT_RUNS.glob("*/result.json")):
        # the committed records, with this directory's runs over them (a rerun replaces its record)
        old = {r["name"]: r for r in load_records(RESULTS_JSONL)} if RESULTS_JSONL.is_file() else {}
        old.update({r["name"]: r for r in load_records(DEFAULT_RUNS, recursive=False)})
        recs = sorted(old.values(), key=lambda r: r["name"])
        tmp = RESULTS_JSONL.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
        os.replace(tmp, RESULTS_JSONL)
        return recs
    return load_records(RESULTS_JSONL)


def cmd_analyze(args) -> None:
    from analysis import analyze, summary_markdown

    recs = _records_for(args)
    out = analyze(recs)
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    _write_json(RESULTS_JSON, out)
    md = summary_markdown(out)
    SUMMARY_MD.write_text(md)
    print(md)


def cmd_plot(args) -> None:
    from plots import make_plots

    recs = _records_for(args)
    out = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else None
    for p in make_plots(recs, out, PLOTS):
        print(p)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        worker(argv[1], float(argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the runs that have no result.json yet")
    r.add_argument("--only", choices=["isoflop", "eta", "pilot", "table", "demo"], default=None)
    r.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each (at most the cores)")
    r.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    r.add_argument("--runs", default=str(DEFAULT_RUNS), help="study directory (one sub-directory per run)")
    r.add_argument("--dry-run", action="store_true", help="list the runs still to do")
    r.add_argument("--filter", default=None, help="only the runs whose name matches this regular expression")
    r.add_argument("--extra", action="append", help="an override added to every run (ablations; use another --runs)")
    r.add_argument("--widths", default=None, help="comma-separated backbone widths instead of the grid's (pilots)")
    for name, hlp in (("analyze", "fit the frontiers"), ("plot", "write the PNGs")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--records", default=None,
                       help="a run directory tree or a .jsonl of records (default: the runs of the study directory, "
                            "else benchmarks/quality/results.jsonl)")
    args = ap.parse_args(argv)
    {"run": cmd_run, "analyze": cmd_analyze, "plot": cmd_plot}[args.cmd](args)


if __name__ == "__main__":
    main()
