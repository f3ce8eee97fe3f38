"""The JTok scaling law from finished runs (PAPER.md, "Parameter counting and the scaling law").

The paper's claim: a JTok(-M) model with N_c activated backbone parameters and N_n = eta * N_c token-indexed
parameters trains like a backbone of N_eff = N_c * (1 + eta * gamma(rho)) parameters. Substituting N_eff into
a loss law L(N, D) turns A into A / (1 + eta gamma)^alpha, so at equal loss
C_JTok = C_base / (1 + eta * gamma): a compute saving of 1 - 1 / (1 + eta * gamma), independent of scale.

What this module does with a set of run records:

1. fit a loss law on the **baseline** runs (``variant == "none"``) by least squares in loss space:
   - ``nd``:    L(N, D) = E + A / N^alpha + B / D^beta         (Chinchilla form; runs at 2+ sizes and 2+ token counts)
   - ``n``:     L(N)    = E + A / N^alpha                       (3+ sizes, D ignored)
   - ``power``: L(N)    = A / N^alpha                           (2 sizes: the least the data can support)
   ``auto`` takes the richest form the baseline runs support. The fit is variable projection: for fixed
   exponents the law is linear in (E, A, B), solved with non-negative coefficients (exact, by enumerating
   active sets); the exponents come from a log-spaced grid refined by Nelder-Mead.
2. for every JTok / JTok-M run, solve the fitted law for the N_eff that explains its loss at its D, and
   gamma = (N_eff / N_c - 1) / eta;
3. per (variant, rho): a pooled gamma (one gamma that best explains all the group's losses), the per-run
   spread and a bootstrap interval over runs; the implied compute saving 1 - 1/(1 + eta gamma) at the
   group's etas;
4. the iso-FLOP view when runs carry a ``budget``: per budget the minimum of a quadratic fit of loss against
   log10 N_c (the paper's U-curves), a frontier log2 L = a log10 C + b per variant, and at a reference compute
   the compute ratio at equal loss and the loss ratio at equal compute (the paper: 35.2% less compute, 2.2%
   lower loss).

Run records (one JSON object per run; the format shared with the quality study): ``result.json`` files found
recursively under directories, ``.jsonl`` files with one record per line, or ``.json`` files (an object or a
list). Extra keys are kept and ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

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


class ScalingError(ValueError):
    """The runs cannot support the requested analysis; the message says what is missing and what to add."""


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


# ------------------------------------------------------------------------------------------------- the law


@dataclass
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (B = 0 for the N-only forms). N is N_c, D training tokens."""

    form: str
    E: float
    A: float
    alpha: float
    B: float = 0.0
    beta: float = 0.0
    rmse: float = 0.0
    r2: float = 1.0
    runs: int = 0
    n_range: tuple[float, float] = (0.0, 0.0)
    d_range: tuple[float, float] = (0.0, 0.0)

    def loss(self, n: Any, d: Any = 1.0) -> Any:
        n = np.asarray(n, dtype=float)
        d = np.asarray(d, dtype=float)
        out = self.E + self.A * n ** (-self.alpha)
        if self.B:
            out = out + self.B * d ** (-self.beta)
        return out

    def n_eff(self, loss: float, d: float = 1.0) -> float:
        """The N whose loss at D equals ``loss`` (inf when the loss is at or below the law's floor at D)."""
        rest = loss - self.E - (self.B * d ** (-self.beta) if self.B else 0.0)
        if rest <= 0:
            return math.inf
        return (self.A / rest) ** (1.0 / self.alpha)

    def describe(self) -> str:
        s = f"L = {self.E:.4g} + {self.A:.4g} / N^{self.alpha:.4f}"
        if self.form == "nd":
            s += f" + {self.B:.4g} / D^{self.beta:.4f}"
        return s


def _nnls_small(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """min ||X c - y|| subject to c >= 0, for a handful of columns: the best feasible active set."""
    k = X.shape[1]
    best_c, best_r = np.zeros(k), float(np.sum(y * y))
    for size in range(1, k + 1):
        for cols in combinations(range(k), size):
            c_sub, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if np.any(c_sub < 0):
                continue
            c = np.zeros(k)
            c[list(cols)] = c_sub
            r = float(np.sum((X @ c - y) ** 2))
            if r < best_r:
                best_c, best_r = c, r
    return best_c, best_r


def _nelder_mead(f, x0: np.ndarray, step: float = 0.1, iters: int = 400, tol: float = 1e-12) -> np.ndarray:
    """Minimise f over R^k (k small) by the Nelder-Mead simplex method."""
    k = len(x0)
    pts = [np.array(x0, dtype=float)] + [np.array(x0, dtype=float) + step * np.eye(k)[i] for i in range(k)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (abs(vals[0]) + tol):
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2.0 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0] + 0.5 * (p - pts[0]) for p in pts]
                vals = [f(p) for p in pts]
    return pts[int(np.argmin(vals))]


def _distinct(values: Sequence[float], rel: float = 1e-6) -> list[float]:
    out: list[float] = []
    for v in sorted(values):
        if not out or abs(v - out[-1]) > rel * abs(out[-1]):
            out.append(v)
    return out


def fit_loss_law(runs: Sequence[dict], form: str = "auto") -> LossLaw:
    """Fit the loss law on baseline runs (records with active_params, tokens, val_loss)."""
    if form not in ("auto", "nd", "n", "power"):
        raise ScalingError(f"law={form!r} is invalid: use auto, nd, n or power")
    base = [r for r in runs if r["variant"] == "none"]
    if not base:
        raise ScalingError(f"no baseline runs (variant=none) among the {len(runs)} records: the loss law is fitted "
                           "on backbone-alone runs; add runs trained with jtok=none")
    N = np.array([r["active_params"] for r in base])
    D = np.array([r["tokens"] for r in base])
    L = np.array([r["val_loss"] for r in base])
    sizes, tokens = _distinct(N.tolist()), _distinct(D.tolist())
    if len(sizes) < 2:
        raise ScalingError(f"all {len(base)} baseline runs have one size (active_params={sizes[0]:.4g}): the N "
                           "exponent needs baseline runs at 2 or more model sizes")
    if form == "auto":
        form = "nd" if len(tokens) >= 2 and len(base) >= 6 else "n" if len(sizes) >= 3 else "power"
    if form == "nd" and (len(tokens) < 2 or len(base) < 6):
        raise ScalingError(f"law=nd needs baseline runs at 2+ token counts and 6+ runs (have {len(tokens)} token "
                           f"counts, {len(base)} runs); use law=n or add runs")
    if form == "n" and len(sizes) < 3:
        raise ScalingError(f"law=n needs baseline runs at 3+ sizes (have {len(sizes)}); use law=power or add sizes")
    # Scale N and D to O(1) so the linear solves are well conditioned; undo the scaling afterwards.
    n0, d0 = float(np.exp(np.mean(np.log(N)))), float(np.exp(np.mean(np.log(D))))
    n, d = N / n0, D / d0

    def design(a: float, b: float) -> np.ndarray:
        cols = [n ** (-a)]
        if form != "power":
            cols.insert(0, np.ones_like(n))
        if form == "nd":
            cols.append(d ** (-b))
        return np.stack(cols, axis=1)

    def resid(x: np.ndarray) -> float:
        a, b = float(np.exp(x[0])), float(np.exp(x[1])) if len(x) > 1 else 0.0
        if not (1e-3 < a < 5 and (form != "nd" or 1e-3 < b < 5)):
            return 1e30
        return _nnls_small(design(a, b), L)[1]

    grid = np.log(np.geomspace(0.02, 2.0, 40))
    if form == "nd":
        cands = [np.array([ga, gb]) for ga in grid for gb in grid]
    else:
        cands = [np.array([ga]) for ga in grid]
    x0 = min(cands, key=resid)
    x = _nelder_mead(resid, x0, step=0.05)
    a, b = float(np.exp(x[0])), float(np.exp(x[1])) if form == "nd" else 0.0
    coef, rss = _nnls_small(design(a, b), L)
    if form == "power":
        E, A, B = 0.0, coef[0], 0.0
    elif form == "n":
        E, A, B = coef[0], coef[1], 0.0
    else:
        E, A, B = coef
    if A <= 0:
        raise ScalingError("the baseline losses do not fall with model size (fitted A = 0): check the runs' "
                           "active_params and val_loss")
    tss = float(np.sum((L - L.mean()) ** 2))
    return LossLaw(
        form=form, E=float(E), A=float(A * n0 ** a), alpha=a, B=float(B * d0 ** b) if form == "nd" else 0.0,
        beta=b, rmse=math.sqrt(rss / len(L)), r2=1.0 - rss / tss if tss > 0 else 1.0, runs=len(base),
        n_range=(float(N.min()), float(N.max())), d_range=(float(D.min()), float(D.max())),
    )


# ------------------------------------------------------------------------------------------------- gamma


def gamma_of_run(law: LossLaw, run: dict) -> dict:
    """N_eff and gamma of one JTok(-M) run under the baseline law."""
    n_eff = law.n_eff(run["val_loss"], run["tokens"])
    nc, eta = run["active_params"], run["eta"]
    gamma = (n_eff / nc - 1.0) / eta if math.isfinite(n_eff) else math.inf
    note = ""
    if not math.isfinite(n_eff):
        note = "loss at or below the fitted law's floor: N_eff unbounded"
    elif not (law.n_range[0] / 2 <= n_eff <= law.n_range[1] * 2):
        note = f"N_eff {n_eff:.3g} outside the baseline sizes [{law.n_range[0]:.3g}, {law.n_range[1]:.3g}] (extrapolated)"
    if law.form == "nd" and not (law.d_range[0] / 2 <= run["tokens"] <= law.d_range[1] * 2):
        note = (note + "; " if note else "") + "D outside the baseline token counts (extrapolated)"
    return {"name": run["name"], "variant": run["variant"], "rho": run["rho"], "eta": eta, "active_params": nc,
            "tokens": run["tokens"], "val_loss": run["val_loss"],
            "baseline_loss_same_nc": float(law.loss(nc, run["tokens"])), "n_eff": n_eff, "gamma": gamma,
            "compute_saving": compute_saving(eta, gamma), "note": note}


def compute_saving(eta: float, gamma: float) -> float:
    """1 - C_JTok / C_base at equal loss = 1 - 1 / (1 + eta * gamma)."""
    if not math.isfinite(gamma):
        return 1.0 if gamma > 0 else -math.inf
    k = 1.0 + eta * gamma
    return 1.0 - 1.0 / k if k > 0 else -math.inf


def _golden(f, lo: float, hi: float, iters: int = 200) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
        if b - a < 1e-12 * max(1.0, abs(a)):
            break
    return (a + b) / 2


def pooled_gamma(law: LossLaw, runs: Sequence[dict]) -> float:
    """The one gamma that best explains the runs' losses: min sum_j (L_j - L(N_c,j (1 + eta_j g), D_j))^2."""
    nc = np.array([r["active_params"] for r in runs])
    eta = np.array([r["eta"] for r in runs])
    d = np.array([r["tokens"] for r in runs])
    y = np.array([r["val_loss"] for r in runs])

    def sse(g: float) -> float:
        k = 1.0 + eta * g
        if np.any(k <= 0):
            return 1e30
        return float(np.sum((law.loss(nc * k, d) - y) ** 2))

    # Bracket: from just above -1/max(eta) to far beyond any per-run gamma, searched on a log scale of (1 + eta g).
    lo = -0.999 / eta.max()
    hi = 1.0
    while sse(hi * 2) < sse(hi) and hi < 1e9:
        hi *= 2
    hi *= 2
    # coarse scan then golden refinement around the best point (the objective is unimodal in practice)
    grid = np.concatenate([np.linspace(lo, 0, 50, endpoint=False), np.geomspace(1e-6, hi, 200)])
    vals = [sse(g) for g in grid]
    i = int(np.argmin(vals))
    return _golden(sse, grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)])


# ------------------------------------------------------------------------------------------------- iso-FLOP


@dataclass
class Frontier:
    """log2 L = slope * log10 C + intercept over the per-budget optima of one variant."""

    variant: str
    slope: float
    intercept: float
    r2: float
    points: list[dict] = field(default_factory=list)   # per budget: compute, best loss, best N_c, method

    def loss(self, compute: float) -> float:
        return 2.0 ** (self.slope * math.log10(compute) + self.intercept)

    def compute_for(self, loss: float) -> float:
        return 10.0 ** ((math.log2(loss) - self.intercept) / self.slope)


def isoflop_frontier(runs: Sequence[dict], variant: str) -> Frontier:
    """Per budget: minimum of a quadratic in log10 N_c through the U-curve (3+ sizes; else the best run)."""
    groups: dict[float, list[dict]] = {}
    for r in runs:
        if r["variant"] == variant and r.get("budget") is not None:
            key = next((b for b in groups if abs(b - r["budget"]) <= 1e-6 * b), r["budget"])
            groups.setdefault(key, []).append(r)
    if len(groups) < 2:
        raise ScalingError(f"iso-FLOP frontier of variant={variant}: runs at {len(groups)} budget(s); need 2+ "
                           "budgets (records with a 'budget')")
    points = []
    for budget in sorted(groups):
        g = groups[budget]
        x = np.log10([r["active_params"] for r in g])
        y = np.array([r["val_loss"] for r in g])
        best = int(np.argmin(y))
        point = {"budget": budget, "runs": len(g), "loss": float(y[best]), "active_params": float(10 ** x[best]),
                 "method": "best run"}
        if len(_distinct(x.tolist())) >= 3:
            c2, c1, c0 = np.polyfit(x, y, 2)
            if c2 > 0:
                xv = -c1 / (2 * c2)
                if x.min() <= xv <= x.max():
                    point.update(loss=float(c0 + c1 * xv + c2 * xv * xv), active_params=float(10 ** xv),
                                 method="quadratic fit")
        points.append(point)
    lc = np.log10([p["budget"] for p in points])
    ll = np.log2([p["loss"] for p in points])
    slope, intercept = np.polyfit(lc, ll, 1)
    pred = slope * lc + intercept
    tss = float(np.sum((ll - ll.mean()) ** 2))
    r2 = 1.0 - float(np.sum((ll - pred) ** 2)) / tss if tss > 0 else 1.0
    return Frontier(variant, float(slope), float(intercept), r2, points)


def compare_frontiers(base: Frontier, other: Frontier, compute: float) -> dict:
    """At ``compute``: the compute ``other`` needs for base's loss, and its loss at the same compute."""
    lb = base.loss(compute)
    lo = other.loss(compute)
    c_other = other.compute_for(lb)
    return {"compute": compute, "base_loss": lb, "loss": lo, "loss_ratio": lo / lb, "lower_loss": 1.0 - lo / lb,
            "compute_ratio": c_other / compute, "compute_saving": 1.0 - c_other / compute}


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
        for c in iso["comparisons"]:
            lines.append(f"  {c['variant']} vs none at C = {c['compute']:.3g}: {_pct(c['compute_saving'])} less compute "
                         f"for the same loss, {_pct(c['lower_loss'])} lower loss at equal compute")
        for s in iso.get("skipped", []):
            lines.append(f"  skipped: {s}")
    return "\n".join(lines)
