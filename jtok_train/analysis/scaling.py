"""The JTok scaling law from finished runs (PAPER.md, "Parameter counting and the scaling law").

The paper's claim: a JTok(-M) model with N_c activated backbone parameters and N_n = eta * N_c token-indexed
parameters trains like a backbone of N_eff = N_c * (1 + eta * gamma(rho)) parameters. Substituting N_eff into
a loss law L(N, D) turns A into A / (1 + eta gamma)^alpha, so at equal loss
C_JTok = C_base / (1 + eta * gamma): a compute saving of 1 - 1 / (1 + eta * gamma), independent of scale.

The fits are in ``jtok_train.analysis.fits`` (shared with benchmarks/quality/analysis.py); this module reads
the run records, puts the fits together (``analyze``) and formats the report. Its names stay importable from
here. What the analysis does with a set of run records:

1. fit a loss law on the **baseline** runs (``variant == "none"``) by least squares in loss space:
   - ``nd``:    L(N, D) = E + A / N^alpha + B / D^beta         (Chinchilla form; runs at 2+ sizes and 2+ token counts)
   - ``n``:     L(N)    = E + A / N^alpha                       (3+ sizes, D ignored)
   - ``power``: L(N)    = A / N^alpha                           (2 sizes: the least the data can support)
   ``auto`` takes the richest form the baseline runs support. The fit is variable projection: for fixed
   exponents the law is linear in (E, A, B), solved with non-negative coefficients (scipy's nnls); the
   exponents come from a log-spaced grid refined by Nelder-Mead (scipy).
2. for every JTok / JTok-M run, solve the fitted law for the N_eff that explains its loss at its D, and
   gamma = (N_eff / N_c - 1) / eta;
3. per (variant, rho): a pooled gamma (one gamma that best explains all the group's losses), the per-run
   spread and a bootstrap interval over runs; the implied compute saving 1 - 1/(1 + eta gamma) at the
   group's etas;
4. the iso-FLOP view when runs carry a ``budget``: per budget with 3+ sizes the minimum of a quadratic fit of
   loss against ln N_c (the paper's U-curves; the best run when the vertex lies outside the sizes), a frontier
   log2 L = a log10 C + b per variant, and at a reference compute the compute ratio at equal loss and the
   loss ratio at equal compute (the paper: 35.2% less compute, 2.2% lower loss).

Run records (one JSON object per run; the format shared with the quality study): ``result.json`` files found
recursively under directories, ``.jsonl`` files with one record per line, or ``.json`` files (an object or a
list). Extra keys are kept and ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jtok_train.analysis.fits import (
    Frontier,
    LossLaw,
    ScalingError,
    _distinct,
    compare_frontiers,
    compute_saving,
    fit_loss_law,
    gamma_of_run,
    isoflop_frontier,
    pooled_gamma,
)

__all__ = [
    "ScalingError",
    "REQUIRED_KEYS",
    "load_records",
    "LossLaw",
    "fit_loss_law",
    "gamma_of_run",
    "pooled_gamma",
    "compute_saving",
    "Frontier",
    "isoflop_frontier",
    "compare_frontiers",
    "analyze",
    "format_report",
]

REQUIRED_KEYS = ("name", "variant", "active_params", "eta", "rho", "tokens", "val_loss")
VARIANTS = ("none", "jtok", "jtokm")


# ------------------------------------------------------------------------------------------------- records


def _check_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ScalingError(f"{where}: a run record must be a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise ScalingError(f"{where}: run record lacks {missing}; every record needs {list(REQUIRED_KEYS)}")
    if rec["variant"] not in VARIANTS:
        raise ScalingError(f"{where}: variant={rec['variant']!r} is invalid: use one of {list(VARIANTS)}")
    out = dict(rec)
    for key in ("active_params", "eta", "rho", "tokens", "val_loss"):
        try:
            out[key] = float(rec[key])
        except (TypeError, ValueError):
            raise ScalingError(f"{where}: {key}={rec[key]!r} is not a number") from None
    for key in ("active_params", "tokens", "val_loss"):
        if not (math.isfinite(out[key]) and out[key] > 0):
            raise ScalingError(f"{where}: {key}={rec[key]!r} is invalid: must be a finite positive number")
    if out["eta"] < 0 or not math.isfinite(out["eta"]):
        raise ScalingError(f"{where}: eta={rec['eta']!r} is invalid: must be >= 0")
    if out["variant"] != "none" and out["eta"] == 0:
        raise ScalingError(f"{where}: a {out['variant']} run with eta=0 has no token-indexed parameters; "
                           "record eta = token_params / active_params")
    if out.get("compute") is None:
        fpt = out.get("flops_per_token")
        out["compute"] = float(fpt) * out["tokens"] if fpt is not None else 6.0 * out["active_params"] * out["tokens"]
    out["compute"] = float(out["compute"])
    b = out.get("budget")
    out["budget"] = float(b) if b is not None else None
    out.setdefault("_source", where)
    return out


def load_records(paths: Iterable[str | Path]) -> list[dict]:
    """Run records from directories (``result.json`` found recursively), ``.jsonl`` and ``.json`` files."""
    records: list[dict] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(path.rglob("result.json"))
            if not files:
                raise ScalingError(f"{path}: no result.json below this directory (a finished run writes one)")
            for f in files:
                records.append(_check_record(_read_json(f), str(f)))
        elif path.is_file() and path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ScalingError(f"{path}:{i}: not JSON ({e.msg}); a .jsonl file holds one record per line") from None
                    records.append(_check_record(rec, f"{path}:{i}"))
        elif path.is_file():
            data = _read_json(path)
            for i, rec in enumerate(data if isinstance(data, list) else [data]):
                records.append(_check_record(rec, f"{path}[{i}]" if isinstance(data, list) else str(path)))
        else:
            raise ScalingError(f"{path}: no such file or directory (give run directories, .jsonl or .json files)")
    return records


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ScalingError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


# ------------------------------------------------------------------------------------------------- report


def analyze(records: Sequence[dict], law_form: str = "auto", at_compute: float | None = None,
            bootstrap: int = 200, seed: int = 0) -> dict:
    """The full analysis as a JSON-able dict."""
    law = fit_loss_law(records, law_form)
    jt = [r for r in records if r["variant"] != "none"]
    if not jt:
        raise ScalingError(f"no JTok or JTok-M runs among the {len(records)} records: gamma needs runs with "
                           "jtok=jtok or jtok=jtokm next to the baselines")
    per_run = [gamma_of_run(law, r) for r in jt]
    groups: dict[tuple[str, float], list[int]] = {}
    for i, r in enumerate(jt):
        groups.setdefault((r["variant"], round(r["rho"], 6)), []).append(i)
    rng = np.random.default_rng(seed)
    pooled = []
    for (variant, rho), idx in sorted(groups.items()):
        runs = [jt[i] for i in idx]
        g = pooled_gamma(law, runs)
        finite = np.array([per_run[i]["gamma"] for i in idx if math.isfinite(per_run[i]["gamma"])])
        boot = []
        if bootstrap and len(runs) >= 2:
            for _ in range(bootstrap):
                pick = rng.integers(0, len(runs), len(runs))
                boot.append(pooled_gamma(law, [runs[j] for j in pick]))
        etas = _distinct([r["eta"] for r in runs], rel=1e-3)
        pooled.append({
            "variant": variant, "rho": rho, "runs": len(runs), "gamma": g,
            "gamma_mean": float(finite.mean()) if len(finite) else math.nan,
            "gamma_std": float(finite.std(ddof=1)) if len(finite) >= 2 else math.nan,
            "gamma_min": float(finite.min()) if len(finite) else math.nan,
            "gamma_max": float(finite.max()) if len(finite) else math.nan,
            "gamma_p16": float(np.percentile(boot, 16)) if boot else math.nan,
            "gamma_p84": float(np.percentile(boot, 84)) if boot else math.nan,
            "compute_saving": [{"eta": e, "saving": compute_saving(e, g)} for e in etas],
        })
    out: dict[str, Any] = {"law": asdict(law), "law_text": law.describe(), "runs": per_run, "pooled": pooled,
                           "warnings": []}
    seen: dict[str, str] = {}
    for i, r in enumerate(records):
        src = r.get("_source", f"record {i}")
        if r["name"] in seen and seen[r["name"]] != src:
            out["warnings"].append(f"run name {r['name']!r} appears more than once ({seen[r['name']]} and "
                                   f"{src}): pass only the runs of one study")
        seen.setdefault(r["name"], src)
    budgets = [r for r in records if r.get("budget") is not None]
    if budgets:
        iso: dict[str, Any] = {"frontiers": {}, "comparisons": []}
        fronts = {}
        for variant in VARIANTS:
            if any(r["variant"] == variant for r in budgets):
                try:
                    fronts[variant] = isoflop_frontier(records, variant)
                    iso["frontiers"][variant] = asdict(fronts[variant])
                except ScalingError as e:
                    iso.setdefault("skipped", []).append(str(e))
        if "none" in fronts:
            base_budgets = [p["budget"] for p in fronts["none"].points]
            for variant, fr in fronts.items():
                if variant == "none":
                    continue
                # compare inside the budgets both variants ran (no extrapolation of either frontier)
                common = [b for b in base_budgets if any(abs(b - p["budget"]) <= 1e-6 * b for p in fr.points)]
                c_ref = at_compute or float(np.exp(np.mean(np.log(common or base_budgets))))
                cmp = compare_frontiers(fronts["none"], fr, c_ref)
                cmp["variant"] = variant
                cmp["per_budget"] = [compare_frontiers(fronts["none"], fr, b) for b in base_budgets]
                iso["comparisons"].append(cmp)
        out["isoflop"] = iso
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "n/a"


def format_report(res: dict) -> str:
    law = res["law"]
    lines = [f"loss law ({law['form']}, {law['runs']} baseline runs): {res['law_text']}",
             f"  rmse {law['rmse']:.4g}, R^2 {law['r2']:.4f}", "", "per run:"]
    hdr = f"  {'name':<28} {'variant':<6} {'rho':>5} {'eta':>7} {'N_c':>10} {'loss':>7} {'base@N_c':>8} {'N_eff':>10} {'gamma':>8} {'saving':>7}"
    lines.append(hdr)
    for r in res["runs"]:
        lines.append(f"  {r['name'][:28]:<28} {r['variant']:<6} {r['rho']:>5.3g} {r['eta']:>7.3g} "
                     f"{r['active_params']:>10.3g} {r['val_loss']:>7.4f} {r['baseline_loss_same_nc']:>8.4f} "
                     f"{r['n_eff']:>10.3g} {r['gamma']:>8.4g} {_pct(r['compute_saving']):>7}"
                     + (f"  ({r['note']})" if r["note"] else ""))
    lines += ["", "pooled gamma per (variant, rho):"]
    for p in res["pooled"]:
        spread = (f"per-run mean {p['gamma_mean']:.4g} +- {p['gamma_std']:.3g} [{p['gamma_min']:.4g}, {p['gamma_max']:.4g}]"
                  if math.isfinite(p["gamma_std"]) else "one run")
        boot = (f", bootstrap 16-84%: [{p['gamma_p16']:.4g}, {p['gamma_p84']:.4g}]"
                if math.isfinite(p["gamma_p16"]) else "")
        savings = ", ".join(f"eta {s['eta']:.3g}: {_pct(s['saving'])}" for s in p["compute_saving"])
        lines.append(f"  {p['variant']} rho={p['rho']:.3g} ({p['runs']} runs): gamma = {p['gamma']:.4g}; {spread}{boot}")
        lines.append(f"    compute saving 1 - 1/(1 + eta gamma): {savings}")
    for w in res.get("warnings", []):
        lines.insert(0, f"warning: {w}")
    iso = res.get("isoflop")
    if iso:
        lines += ["", "iso-FLOP frontiers (log2 L = a log10 C + b over per-budget optima):"]
        for variant, fr in iso["frontiers"].items():
            lines.append(f"  {variant:<6} a = {fr['slope']:.4f}, b = {fr['intercept']:.4f}, R^2 {fr['r2']:.4f}, "
                         f"{len(fr['points'])} budgets")
            lines += [f"    {variant} skipped {s}" for s in fr.get("skipped", [])]
        for c in iso["comparisons"]:
            lines.append(f"  {c['variant']} vs none at C = {c['compute']:.3g}: {_pct(c['compute_saving'])} less compute "
                         f"for the same loss, {_pct(c['lower_loss'])} lower loss at equal compute")
        for s in iso.get("skipped", []):
            lines.append(f"  skipped: {s}")
    return "\n".join(lines)
