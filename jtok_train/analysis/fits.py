"""The fits of the scaling analysis (PAPER.md, "Parameter counting and the scaling law", "Iso-FLOPs").

- the loss law of the baseline runs (``fit_loss_law``) and, under it, gamma of JTok(-M) runs
  (``gamma_of_run``, ``pooled_gamma``);
- the iso-FLOP view: one budget's U-curve optimum (``fit_ucurve``), the frontier through the optima
  (``fit_frontier``, ``isoflop_frontier``) and two frontiers compared (``compare_frontiers``).

``jtok-scaling`` (``jtok_train.analysis.scaling``) and the quality study (``benchmarks/quality/analysis.py``)
both use these, so both apply one rule. The optimisers are scipy's (the ``analysis`` extra).

The iso-FLOP rule, and why (the two copies this replaced differed in two places):

- U-curve: least squares quadratic of loss against ln N_c over the budget's runs. Its vertex is the optimum
  when the quadratic is convex and the vertex lies inside the sampled sizes. Otherwise the optimum is not
  located, and the budget's point is its **best run** (``interior: False``, method "best run"), not the
  fitted curve's minimum over the sampled range (the quality study's former rule): measured on U-curves of
  the Chinchilla law L = 1.8 + 400/N^0.34 + 410/D^0.28 (5 sizes per budget, grid off-centre by up to e^2.5,
  ~1900 budgets whose vertex fell outside, per noise level), against the true minimum over the sampled sizes
  the best run errs by rms 0 / 4.5e-3 / 1.3e-2 at relative noise 0 / 0.1% / 0.3%, the fitted curve's edge
  by 6.7e-3 / 7.8e-3 / 1.4e-2 (bias +5.9e-3: a quadratic misfits a monotone side worst at its ends).
  With 3 sizes per budget (the committed study) the two agree to 1e-14.
- A budget with fewer than 3 distinct sizes has no U-curve and gives no point (listed as skipped), as in
  the quality study; ``jtok-scaling`` used to take its best run. A budget still being trained (the study
  is analysed while it runs) would otherwise put an arbitrary upper bound on the frontier.
- Frontier: log2 L = slope log10 C + intercept (the paper's axes) by least squares over the budgets'
  optima; the quality study's log10 L form is the same line (its coefficients are these times log10 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

try:
    from scipy.optimize import minimize, minimize_scalar, nnls
except ModuleNotFoundError as e:   # the CLI prints this one line
    raise ModuleNotFoundError("the scaling analysis needs scipy: pip install 'jtok-train[analysis]'",
                              name="scipy") from e

__all__ = [
    "ScalingError",
    "LossLaw",
    "fit_loss_law",
    "gamma_of_run",
    "pooled_gamma",
    "compute_saving",
    "fit_ucurve",
    "fit_frontier",
    "Frontier",
    "isoflop_points",
    "isoflop_frontier",
    "compare_frontiers",
]


class ScalingError(ValueError):
    """The runs cannot support the requested analysis; the message says what is missing and what to add."""


def _distinct(values: Sequence[float], rel: float = 1e-6) -> list[float]:
    out: list[float] = []
    for v in sorted(values):
        if not out or abs(v - out[-1]) > rel * abs(out[-1]):
            out.append(v)
    return out


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


def _nnls(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """min ||X c - y||^2 subject to c >= 0; the residual is recomputed, not taken from nnls's rnorm."""
    c, _ = nnls(X, y)
    return c, float(np.sum((X @ c - y) ** 2))


def fit_loss_law(runs: Sequence[dict], form: str = "auto") -> LossLaw:
    """Fit the loss law on baseline runs (records with active_params, tokens, val_loss).

    Variable projection: for fixed exponents the law is linear in (E, A, B), solved with non-negative
    coefficients (scipy's nnls); the exponents come from a log-spaced grid refined by Nelder-Mead (scipy).
    """
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
        return _nnls(design(a, b), L)[1]

    grid = np.log(np.geomspace(0.02, 2.0, 40))
    if form == "nd":
        cands = [np.array([ga, gb]) for ga in grid for gb in grid]
    else:
        cands = [np.array([ga]) for ga in grid]
    x0 = min(cands, key=resid)
    simplex = np.vstack([x0, x0 + 0.05 * np.eye(len(x0))])
    x = minimize(resid, x0, method="Nelder-Mead",
                 options={"initial_simplex": simplex, "xatol": 1e-10, "fatol": 1e-15, "maxiter": 2000}).x
    a, b = float(np.exp(x[0])), float(np.exp(x[1])) if form == "nd" else 0.0
    coef, rss = _nnls(design(a, b), L)
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


def compute_saving(eta: float, gamma: float) -> float:
    """1 - C_JTok / C_base at equal loss = 1 - 1 / (1 + eta * gamma)."""
    if not math.isfinite(gamma):
        return 1.0 if gamma > 0 else -math.inf
    k = 1.0 + eta * gamma
    return 1.0 - 1.0 / k if k > 0 else -math.inf


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

    # Bracket: from just above -1/max(eta) to far beyond any per-run gamma.
    lo = -0.999 / eta.max()
    hi = 1.0
    while sse(hi * 2) < sse(hi) and hi < 1e9:
        hi *= 2
    hi *= 2
    # coarse scan, then Brent's bounded search between the best point's neighbours (the objective is
    # unimodal in practice)
    grid = np.concatenate([np.linspace(lo, 0, 50, endpoint=False), np.geomspace(1e-6, hi, 200)])
    i = int(np.argmin([sse(g) for g in grid]))
    bounds = (float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)]))
    return float(minimize_scalar(sse, bounds=bounds, method="bounded", options={"xatol": 1e-12}).x)


# ------------------------------------------------------------------------------------------------- iso-FLOP


def fit_ucurve(n: Iterable[float], loss: Iterable[float]) -> dict[str, Any]:
    """One budget's optimum from its runs' sizes ``n`` (N_c) and losses (the rule: the module docstring).

    Returns n_opt, loss_opt, interior (the vertex lies inside the sampled sizes), method ("quadratic fit" or
    "best run"), runs, coef (the quadratic in ln N_c, highest power first), min_observed, n_min_observed.
    """
    nn = np.asarray(list(n), dtype=float)
    y = np.asarray(list(loss), dtype=float)
    distinct = len(_distinct(nn.tolist())) if nn.size else 0
    if nn.size != y.size or distinct < 3:
        raise ScalingError(f"a U-curve fit needs 3 or more distinct sizes, got {nn.size} points ({distinct} "
                           "distinct): add backbone sizes to the budget")
    x = np.log(nn)
    c2, c1, c0 = np.polyfit(x, y, 2)
    best = int(np.argmin(y))
    xv = -c1 / (2 * c2) if c2 > 0 else math.nan
    interior = bool(c2 > 0 and x.min() <= xv <= x.max())
    out = {"n_opt": float(nn[best]), "loss_opt": float(y[best]), "interior": interior, "method": "best run",
           "runs": int(nn.size), "coef": [float(c2), float(c1), float(c0)], "min_observed": float(y[best]),
           "n_min_observed": float(nn[best])}
    if interior:
        out.update(n_opt=float(math.exp(xv)), loss_opt=float(c0 + c1 * xv + c2 * xv * xv), method="quadratic fit")
    return out


def fit_frontier(compute: Iterable[float], loss: Iterable[float]) -> dict[str, float]:
    """log2 L = slope * log10 C + intercept by least squares, with R^2."""
    lc = np.log10(np.asarray(list(compute), dtype=float))
    ll = np.log2(np.asarray(list(loss), dtype=float))
    if lc.size != ll.size or len(_distinct(lc.tolist(), rel=1e-9)) < 2:
        raise ScalingError(f"a frontier fit needs 2 or more budgets, got {len(_distinct(lc.tolist(), rel=1e-9))}: "
                           "add budgets")
    slope, intercept = np.polyfit(lc, ll, 1)
    tss = float(np.sum((ll - ll.mean()) ** 2))
    r2 = 1.0 - float(np.sum((ll - (slope * lc + intercept)) ** 2)) / tss if tss > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


@dataclass
class Frontier:
    """log2 L = slope * log10 C + intercept over the per-budget optima of one variant."""

    variant: str
    slope: float
    intercept: float
    r2: float
    points: list[dict] = field(default_factory=list)   # per budget: compute, best loss, best N_c, method
    skipped: list[str] = field(default_factory=list)   # budgets without a U-curve (fewer than 3 sizes)

    def loss(self, compute: float) -> float:
        return 2.0 ** (self.slope * math.log10(compute) + self.intercept)

    def compute_for(self, loss: float) -> float:
        return 10.0 ** ((math.log2(loss) - self.intercept) / self.slope)


def isoflop_points(runs: Sequence[dict], variant: str) -> tuple[list[tuple[float, dict]], list[str]]:
    """Per budget of ``variant``'s runs (records with a ``budget``; budgets equal within 1e-6 are one):
    (budget, fit_ucurve of its runs), in budget order; and a line per budget skipped for too few sizes."""
    groups: dict[float, list[dict]] = {}
    for r in runs:
        if r["variant"] == variant and r.get("budget") is not None:
            b = float(r["budget"])
            key = next((k for k in groups if abs(k - b) <= 1e-6 * k), b)
            groups.setdefault(key, []).append(r)
    points, skipped = [], []
    for budget in sorted(groups):
        g = groups[budget]
        try:
            points.append((budget, fit_ucurve([float(r["active_params"]) for r in g], [float(r["val_loss"]) for r in g])))
        except ScalingError as e:
            skipped.append(f"budget {budget:.4g}: {e}")
    return points, skipped


def isoflop_frontier(runs: Sequence[dict], variant: str) -> Frontier:
    """The frontier through the U-curve optima of ``variant``'s budgets (2+ budgets with 3+ sizes each)."""
    points, skipped = isoflop_points(runs, variant)
    if len(points) < 2:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise ScalingError(f"iso-FLOP frontier of variant={variant}: {len(points)} budget(s) with runs at 3+ sizes"
                           f"{why}; need 2+ such budgets (records with a 'budget')")
    fit = fit_frontier([b for b, _ in points], [u["loss_opt"] for _, u in points])
    pts = [{"budget": b, "runs": u["runs"], "loss": u["loss_opt"], "active_params": u["n_opt"], "method": u["method"],
            "interior": u["interior"]} for b, u in points]
    return Frontier(variant, fit["slope"], fit["intercept"], fit["r2"], pts, skipped)


def compare_frontiers(base: Frontier, other: Frontier, compute: float) -> dict:
    """At ``compute``: the compute ``other`` needs for base's loss, and its loss at the same compute."""
    lb = base.loss(compute)
    lo = other.loss(compute)
    c_other = other.compute_for(lb)
    return {"compute": compute, "base_loss": lb, "loss": lo, "loss_ratio": lo / lb, "lower_loss": 1.0 - lo / lb,
            "compute_ratio": c_other / compute, "compute_saving": 1.0 - c_other / compute}
