"""Fits of the iso-FLOP quality study (PAPER.md, "Iso-FLOPs"), on run records of the shared format.

The iso-FLOP fits are ``jtok_train.analysis.fits``'s, the ones ``jtok-scaling`` uses (one rule; it and the
reason for it are in that module's docstring). This module adds the study's bookkeeping and tables:

- U-curve of a budget (3+ distinct sizes, else the budget is left out): quadratic fit of loss vs ln N_c
  (N_c = active_params); its vertex is the budget's optimum when it lies inside the sampled sizes; otherwise
  the budget's best run (flagged ``interior: false``).
- Frontier of a variant: least squares log10 L_opt = intercept + slope * log10 C over the budgets (the paper
  writes log2 L = a log10 C + b: a = slope / log10 2, b = intercept / log10 2; the fit is done in log2 L,
  the same line).
- Compute JTok-M needs for the baseline's loss: C' with L_m(C') = L_base(C), so C'/C = 10^((i_b - i_m +
  (s_b - s_m) log10 C) / s_m); "saving" = 1 - C'/C (paper: 35.2%). Loss gap at equal compute:
  L_m(C) / L_base(C) - 1 (paper: -2.2%). Both at the geometric mean of the budgets and at each budget.
- Seeds: every fit is done per seed (the spread: mean, min, max) and once on the seed-averaged losses.
- Table-size sweep: L vs log2 N_n at a fixed backbone and fixed tokens, linear (paper: about -0.0118 per
  doubling, R^2 0.996).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from jtok_train.analysis import fits
from jtok_train.analysis.fits import fit_ucurve   # one budget's optimum; a ValueError below 3 distinct sizes

__all__ = ["fit_ucurve", "fit_frontier", "frontier_loss", "compute_ratio", "loss_gap", "fit_loglinear",
           "analyze", "summary_markdown"]

PAPER = {
    "compute_saving": 0.352,          # JTok-M reaches the baseline's loss with 35.2% less compute
    "loss_gap": -0.022,               # and has 2.2% lower loss at equal compute
    "frontier_base_log2": (-0.2016, 5.1334),    # log2 L = a log10 C + b
    "frontier_jtokm_log2": (-0.2009, 5.0881),
    "eta_slope_per_doubling": -0.0118,
    "eta_r2": 0.996,
}
LOG10_2 = math.log10(2)


def _log10_frontier(f: dict[str, float]) -> dict[str, float]:
    """A log2 L = a log10 C + b fit as this study writes it: log10 L = intercept + slope log10 C, plus a, b."""
    return {"slope": f["slope"] * LOG10_2, "intercept": f["intercept"] * LOG10_2, "r2": f["r2"],
            "log2_a": f["slope"], "log2_b": f["intercept"]}


def _as_frontier(f: dict[str, float]) -> fits.Frontier:
    return fits.Frontier("", f["slope"] / LOG10_2, f["intercept"] / LOG10_2, f.get("r2", math.nan))


def fit_frontier(compute: Iterable[float], loss: Iterable[float]) -> dict[str, float]:
    """log10 L = intercept + slope * log10 C (least squares; jtok_train.analysis.fits.fit_frontier)."""
    return _log10_frontier(fits.fit_frontier(compute, loss))


def frontier_loss(front: dict[str, float], compute: float) -> float:
    return _as_frontier(front).loss(compute)


def compute_ratio(base: dict[str, float], other: dict[str, float], compute: float) -> float:
    """C'/C: the compute ``other`` needs to reach the loss ``base`` reaches with ``compute``."""
    return fits.compare_frontiers(_as_frontier(base), _as_frontier(other), compute)["compute_ratio"]


def loss_gap(base: dict[str, float], other: dict[str, float], compute: float) -> float:
    """L_other(C) / L_base(C) - 1 on the frontiers."""
    return fits.compare_frontiers(_as_frontier(base), _as_frontier(other), compute)["loss_ratio"] - 1.0


def fit_loglinear(x: Iterable[float], y: Iterable[float]) -> dict[str, float]:
    """y = intercept + slope * log2 x, with R^2."""
    lx = np.log2(np.asarray(list(x), dtype=float))
    yy = np.asarray(list(y), dtype=float)
    if np.unique(lx).size < 2:
        raise ValueError("a log-linear fit needs 2 or more distinct sizes")
    slope, intercept = np.polyfit(lx, yy, 1)
    pred = intercept + slope * lx
    ss_tot = float(((yy - yy.mean()) ** 2).sum())
    r2 = 1.0 - float(((yy - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"slope_per_doubling": float(slope), "intercept": float(intercept), "r2": r2, "points": int(lx.size)}


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "n": len(values)}


def _frontiers(records: list[dict]) -> dict[str, Any]:
    """Records (variant, budget, active_params, val_loss) -> per variant the U-curve fits and the frontier."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        points, _ = fits.isoflop_points(records, variant)
        entry: dict[str, Any] = {"ucurves": {f"{c:.4g}": u for c, u in points}}
        if len(points) >= 2:
            entry["frontier"] = fit_frontier([c for c, _ in points], [u["loss_opt"] for _, u in points])
        out[variant] = entry
    return out


def _comparisons(fr: dict[str, Any], budgets: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "frontier" not in fr.get("none", {}) or not budgets:
        return out
    base = fr["none"]["frontier"]
    mid = float(10 ** np.mean(np.log10(budgets)))
    for variant in ("jtok", "jtokm"):
        if "frontier" not in fr.get(variant, {}):
            continue
        f = fr[variant]["frontier"]
        ratios = [compute_ratio(base, f, c) for c in budgets]
        gaps = [loss_gap(base, f, c) for c in budgets]
        out[variant] = {"compute_saving_mid": 1.0 - compute_ratio(base, f, mid), "loss_gap_mid": loss_gap(base, f, mid),
                        "compute_saving_per_budget": [1.0 - r for r in ratios], "loss_gap_per_budget": gaps}
    return out


def analyze(records: list[dict]) -> dict[str, Any]:
    """Fits of the iso-FLOP group (per seed and on the seed means) and of the table-size sweep."""
    iso = [r for r in records if r.get("group") == "isoflop" and r.get("budget")]
    budgets = sorted({float(r["budget"]) for r in iso})
    seeds = sorted({int(r["seed"]) for r in iso})
    out: dict[str, Any] = {"budgets": budgets, "seeds": seeds, "runs": len(records), "paper": PAPER}

    per_seed = {}
    for s in seeds:
        fr = _frontiers([r for r in iso if int(r["seed"]) == s])
        per_seed[str(s)] = {"fits": fr, "comparison": _comparisons(fr, budgets)}
    out["per_seed"] = per_seed
    # the seed-averaged losses: per variant, over the seeds that ran its whole grid (the same seeds in
    # every cell), else over the seeds each cell has
    cells_of = defaultdict(set)
    for r in iso:
        cells_of[r["variant"]].add((float(r["budget"]), int(r["hidden_size"])))
    complete: dict[str, set] = {}
    for v, cells in cells_of.items():
        done = {s for s in seeds if cells <= {(float(r["budget"]), int(r["hidden_size"])) for r in iso
                                              if r["variant"] == v and int(r["seed"]) == s}}
        complete[v] = done
    out["seed_mean_seeds"] = {v: sorted(s) for v, s in complete.items()}
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in iso:
        if complete[r["variant"]] and int(r["seed"]) not in complete[r["variant"]]:
            continue
        groups[(r["variant"], float(r["budget"]), float(r["active_params"]), int(r["hidden_size"]))].append(
            float(r["val_loss"]))
    mean_pts: list[dict] = []
    table = []
    for (v, c, n, d), ls in sorted(groups.items()):
        mean_pts.append({"variant": v, "budget": c, "active_params": n, "val_loss": float(np.mean(ls))})
        table.append({"variant": v, "budget": c, "hidden_size": d, "active_params": n, "val_loss_mean": float(np.mean(ls)),
                      "val_loss_min": float(np.min(ls)), "val_loss_max": float(np.max(ls)), "seeds": len(ls)})
    out["losses"] = table
    fr = _frontiers(mean_pts)
    out["seed_mean"] = {"fits": fr, "comparison": _comparisons(fr, budgets)}
    spread: dict[str, Any] = {}
    for variant in ("jtok", "jtokm"):
        vals = [per_seed[str(s)]["comparison"].get(variant) for s in seeds]
        vals = [v for v in vals if v]
        if vals:
            spread[variant] = {"compute_saving_mid": _spread([v["compute_saving_mid"] for v in vals]),
                               "loss_gap_mid": _spread([v["loss_gap_mid"] for v in vals])}
    out["seed_spread"] = spread
    # same backbone, same compute: the loss ratio of each (budget, width) cell, over seeds
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in iso:
        cells[(float(r["budget"]), int(r["hidden_size"]), int(r["seed"]))][r["variant"]].append(float(r["val_loss"]))
    paired: dict[str, list[float]] = defaultdict(list)
    for cell in cells.values():
        if "none" in cell:
            for v in ("jtok", "jtokm"):
                if v in cell:
                    paired[v].append(cell[v][0] / cell["none"][0] - 1.0)
    out["paired_loss_ratio"] = {v: _spread(x) for v, x in paired.items()}
    # table-size sweep: per series (rho fixed at the sweep's most common rho; K fixed), the seed-mean loss
    # at each N_n, a log-linear fit, and the backbone alone at the same width, tokens and seeds
    eta = sorted((r for r in records if r.get("group") == "eta_sweep"), key=lambda r: (r["token_params"], r["seed"]))
    if eta:
        keys = ("name", "num_sets", "top_k", "rho", "eta", "token_params", "active_params", "val_loss", "seed", "tokens")
        sw: dict[str, Any] = {"points": [{k: r[k] for k in keys} for r in eta]}

        def series(rs):
            by_n: dict[int, list[float]] = defaultdict(list)
            for r in rs:
                by_n[int(r["token_params"])].append(float(r["val_loss"]))
            pts = [{"token_params": n, "val_loss_mean": float(np.mean(v)), "seeds": len(v),
                    "val_loss_min": float(np.min(v)), "val_loss_max": float(np.max(v))} for n, v in sorted(by_n.items())]
            res: dict[str, Any] = {"points": pts, "seeds": sorted({int(r["seed"]) for r in rs})}
            if len(pts) >= 2:
                res["fit"] = fit_loglinear([p["token_params"] for p in pts], [p["val_loss_mean"] for p in pts])
            return res

        rhos = [round(float(r["rho"]), 6) for r in eta]
        rho0 = max(set(rhos), key=rhos.count)
        sw["rho_fixed"] = dict(series([r for r in eta if round(float(r["rho"]), 6) == rho0]), rho=rho0)
        ks = [int(r["top_k"]) for r in eta]
        k_series = [k for k in sorted(set(ks)) if len({r["num_sets"] for r in eta if r["top_k"] == k}) >= 2]
        if k_series:
            k0 = max(k_series, key=ks.count)
            sw["k_fixed"] = dict(series([r for r in eta if int(r["top_k"]) == k0]), top_k=k0)
        if "fit" in sw["rho_fixed"]:
            sw["fit"] = sw["rho_fixed"]["fit"]
        d, tokens = eta[0]["hidden_size"], eta[0]["tokens"]
        ref = [r for r in records if r.get("variant") == "none" and r.get("hidden_size") == d
               and r.get("tokens") == tokens and r.get("num_layers") == eta[0]["num_layers"]]
        ref_same = [r for r in ref if int(r["seed"]) in set(sw["rho_fixed"]["seeds"])]
        if ref_same or ref:
            sw["backbone_alone_val_loss"] = _spread([float(r["val_loss"]) for r in (ref_same or ref)])
            sw["backbone_alone_seeds"] = sorted({int(r["seed"]) for r in (ref_same or ref)})
        out["eta_sweep"] = sw
    pilot = pilot_table(records)
    if pilot:
        out["pilot"] = pilot
    table = table_sweep(records)
    if table:
        out["table_sweep"] = table
    demo = demo_losses(records)
    if demo:
        out["demo"] = demo
    return out


def _by_seed_ratio(rs: list[dict], ref: dict[int, float]) -> list[float]:
    return [float(r["val_loss"]) / ref[int(r["seed"])] - 1.0 for r in rs if int(r["seed"]) in ref]


def pilot_table(records: list[dict]) -> list[dict]:
    """Static JTok's init pilot: per backbone and setting (scale_init, table_init_std, scale_lr_mult), the
    validation loss over seeds and its ratio to the backbone alone of the same seed (paired)."""
    pil = [r for r in records if r.get("group") == "pilot"]
    rows = []
    for bb in sorted({r.get("backbone", "moe") for r in pil}, key=lambda b: b != "moe"):
        rs = [r for r in pil if r.get("backbone", "moe") == bb]
        ref = {int(r["seed"]): float(r["val_loss"]) for r in rs if r["variant"] == "none"}
        settings: dict[tuple, list[dict]] = defaultdict(list)
        for r in rs:
            if r["variant"] != "none":
                ji = r["jtok_init"]
                settings[(ji["scale_init"], ji["table_init_std"], ji["scale_lr_mult"])].append(r)
        if ref:
            rows.append({"backbone": bb, "setting": None, "val_loss": _spread(list(ref.values())),
                         "vs_backbone": None, "seeds": sorted(ref)})
        for key in sorted(settings):
            srs = settings[key]
            ratio = _by_seed_ratio(srs, ref)
            rows.append({"backbone": bb, "setting": dict(zip(("scale_init", "table_init_std", "scale_lr_mult"), key)),
                         "val_loss": _spread([float(r["val_loss"]) for r in srs]),
                         "vs_backbone": _spread(ratio) if ratio else None,
                         "seeds": sorted(int(r["seed"]) for r in srs)})
    return rows


def table_sweep(records: list[dict]) -> dict[str, Any] | None:
    """The long table-size sweep: loss vs log2 N_n at a fixed backbone and tokens, fitted on the seed means and
    per seed (the spread of the slope), with the backbone alone at the same tokens."""
    tab = [r for r in records if r.get("group") == "table_sweep"]
    jm = [r for r in tab if r["variant"] == "jtokm"]
    if not jm:
        return None
    by_n: dict[int, list[dict]] = defaultdict(list)
    for r in jm:
        by_n[int(r["token_params"])].append(r)
    pts = [{"token_params": n, "num_sets": rs[0]["num_sets"], "top_k": rs[0]["top_k"], "eta": rs[0]["eta"],
            "val_loss_mean": float(np.mean([r["val_loss"] for r in rs])),
            "val_loss_min": float(min(r["val_loss"] for r in rs)), "val_loss_max": float(max(r["val_loss"] for r in rs)),
            "seeds": sorted(int(r["seed"]) for r in rs)} for n, rs in sorted(by_n.items())]
    out: dict[str, Any] = {"points": pts, "tokens": jm[0]["tokens"], "hidden_size": jm[0]["hidden_size"],
                           "rho": jm[0]["rho"], "paper_slope_per_doubling": PAPER["eta_slope_per_doubling"],
                           "paper_r2": PAPER["eta_r2"]}
    if len(pts) >= 2:
        out["fit"] = fit_loglinear([p["token_params"] for p in pts], [p["val_loss_mean"] for p in pts])
    per_seed = {}
    for seed in sorted({int(r["seed"]) for r in jm}):
        rs = sorted((r for r in jm if int(r["seed"]) == seed), key=lambda r: r["token_params"])
        if len({r["token_params"] for r in rs}) >= 2:
            per_seed[str(seed)] = fit_loglinear([r["token_params"] for r in rs], [r["val_loss"] for r in rs])
    out["per_seed"] = per_seed
    if per_seed:
        out["slope_spread"] = _spread([f["slope_per_doubling"] for f in per_seed.values()])
        out["r2_spread"] = _spread([f["r2"] for f in per_seed.values()])
    base = [float(r["val_loss"]) for r in tab if r["variant"] == "none"]
    if base:
        out["backbone_alone_val_loss"] = _spread(base)
    return out


def demo_losses(records: list[dict]) -> dict[str, Any] | None:
    """The demo recipe with the configs' defaults: validation loss per variant over seeds."""
    demo = [r for r in records if r.get("group") == "demo"]
    if not demo:
        return None
    out = {}
    for v in ("none", "jtok", "jtokm"):
        rs = [r for r in demo if r["variant"] == v]
        if rs:
            out[v] = {**_spread([float(r["val_loss"]) for r in rs]), "seeds": sorted(int(r["seed"]) for r in rs),
                      "init": rs[0].get("jtok_init")}
    ref = {int(r["seed"]): float(r["val_loss"]) for r in demo if r["variant"] == "none"}
    for v in ("jtok", "jtokm"):
        if v in out:
            ratio = _by_seed_ratio([r for r in demo if r["variant"] == v], ref)
            out[v]["vs_backbone"] = _spread(ratio) if ratio else None
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def summary_markdown(out: dict[str, Any]) -> str:
    """The tables of BENCHMARKS.md: the study against the paper's figures."""
    lines = ["# Iso-FLOP quality study (small scale, CPU)", ""]
    b = out["budgets"]
    lines.append(f"{out['runs']} runs; budgets C = {', '.join(f'{c:.3g}' for c in b)} FLOPs; seeds {out['seeds']}; "
                 "seed-mean fits over the seeds with a complete grid: "
                 + ", ".join(f"{v} {s}" for v, s in sorted(out.get("seed_mean_seeds", {}).items())) + ".")
    lines.append("")
    lines += ["| figure | paper (3e18..3e20 FLOPs) | this study, seed mean fit | per seed (mean; min..max) |",
              "|---|---|---|---|"]
    sm = out["seed_mean"]
    for variant, label in (("jtokm", "JTok-M"), ("jtok", "JTok")):
        comp = sm["comparison"].get(variant)
        spr = out["seed_spread"].get(variant)
        if not comp:
            continue
        paper_s = f"{100 * PAPER['compute_saving']:.1f}%" if variant == "jtokm" else "n/a"
        paper_g = f"{100 * PAPER['loss_gap']:.1f}%" if variant == "jtokm" else "n/a"

        def sp(key):
            if not spr:
                return "n/a"
            s = spr[key]
            return f"{_pct(s['mean'])} ({_pct(s['min'])}..{_pct(s['max'])}, {s['n']} seeds)"

        lines.append(f"| {label}: compute saved for the baseline's loss (mid budget) | {paper_s} | "
                     f"{_pct(comp['compute_saving_mid'])} | {sp('compute_saving_mid')} |")
        lines.append(f"| {label}: loss vs baseline at equal compute (mid budget) | {paper_g} | "
                     f"{_pct(comp['loss_gap_mid'])} | {sp('loss_gap_mid')} |")
    for variant, label, key in (("none", "baseline", "frontier_base_log2"), ("jtokm", "JTok-M", "frontier_jtokm_log2"),
                                ("jtok", "JTok", None)):
        f = sm["fits"].get(variant, {}).get("frontier")
        if f:
            paper = f"log2 L = {PAPER[key][0]:.4f} log10 C + {PAPER[key][1]:.4f}" if key else "n/a"
            lines.append(f"| frontier, {label} | {paper} | log2 L = {f['log2_a']:.4f} log10 C + {f['log2_b']:.4f} "
                         f"(R^2 {f['r2']:.3f}) | |")
    sw = out.get("eta_sweep")
    for key, label in (("rho_fixed", "rho fixed"), ("k_fixed", "K fixed")):
        ser = (sw or {}).get(key, {})
        if "fit" in ser:
            f = ser["fit"]
            what = f"rho {ser['rho']:g}" if key == "rho_fixed" else f"K {ser['top_k']}"
            paper = f"{PAPER['eta_slope_per_doubling']:+.4f} (R^2 {PAPER['eta_r2']}, rho 0.25)" if key == "rho_fixed" else ""
            lines.append(f"| JTok-M table size ({what}): loss change per doubling of N_n | {paper} | "
                         f"{f['slope_per_doubling']:+.4f} (R^2 {f['r2']:.3f}, {f['points']} sizes, seeds {ser['seeds']}) | |")
    pr = out.get("paired_loss_ratio", {})
    for variant, label in (("jtok", "JTok"), ("jtokm", "JTok-M")):
        if variant in pr:
            s = pr[variant]
            lines.append(f"| {label}: loss vs baseline, same width, budget and seed (all cells) | | {_pct(s['mean'])} "
                         f"({_pct(s['min'])}..{_pct(s['max'])}, {s['n']} cells) | |")
    lines += ["", "## Optima of the U-curves (seed-mean losses)", "",
              "| variant | budget C | N_c at the optimum | L_opt | vertex inside the sampled sizes |", "|---|---|---|---|---|"]
    for variant in ("none", "jtok", "jtokm"):
        for c, u in sm["fits"].get(variant, {}).get("ucurves", {}).items():
            lines.append(f"| {variant} | {c} | {u['n_opt']:.3g} | {u['loss_opt']:.4f} | {'yes' if u['interior'] else 'no (edge)'} |")
    lines += ["", "## Validation loss per run (mean over seeds, min..max)", "",
              "| budget C | width d | N_c | base | + JTok | + JTok-M |", "|---|---|---|---|---|---|"]
    cell: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in out["losses"]:
        cell[(row["budget"], row["hidden_size"])][row["variant"]] = row
    for (c, d), vs in sorted(cell.items()):
        n = next(iter(vs.values()))["active_params"]

        def fmt(v):
            r = vs.get(v)
            return f"{r['val_loss_mean']:.4f} ({r['val_loss_min']:.3f}..{r['val_loss_max']:.3f})" if r else "-"

        lines.append(f"| {c:.3g} | {d} | {n:.3g} | {fmt('none')} | {fmt('jtok')} | {fmt('jtokm')} |")
    if sw:
        lines += ["", "## JTok-M table size at a fixed backbone (runs)", "",
                  "| n_e | K | rho | eta | N_n | seed | val loss |", "|---|---|---|---|---|---|---|"]
        for p in sw["points"]:
            lines.append(f"| {p['num_sets']} | {p['top_k']} | {p['rho']:.3g} | {p['eta']:.3g} | {p['token_params']:.3g} | "
                         f"{p['seed']} | {p['val_loss']:.4f} |")
        if "backbone_alone_val_loss" in sw:
            b0 = sw["backbone_alone_val_loss"]
            lines.append(f"| backbone alone | | | 0 | 0 | {sw['backbone_alone_seeds']} | {b0['mean']:.4f} (mean) |")
    lines += _pilot_markdown(out.get("pilot")) + _table_markdown(out.get("table_sweep")) + _demo_markdown(out.get("demo"))
    return "\n".join(lines) + "\n"


def _ls(s: dict[str, float]) -> str:
    return f"{s['mean']:.4f} ({s['min']:.3f}..{s['max']:.3f})"


def _pilot_markdown(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Pilot: static JTok's init (validation loss, mean over seeds, min..max)", "",
             "| backbone | scale_init | table_init_std | scale_lr_mult | val loss | vs backbone (paired by seed) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["setting"]
        if st is None:
            lines.append(f"| {r['backbone']} | backbone alone | | | {_ls(r['val_loss'])} | | {r['seeds']} |")
            continue
        vs = r["vs_backbone"]
        lines.append(f"| {r['backbone']} | {st['scale_init']:g} | {st['table_init_std']:g} | {st['scale_lr_mult']:g} | "
                     f"{_ls(r['val_loss'])} | {_pct(vs['mean']) + ' (' + _pct(vs['min']) + '..' + _pct(vs['max']) + ')' if vs else '-'} "
                     f"| {r['seeds']} |")
    return lines


def _table_markdown(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return []
    lines = ["", f"## JTok-M table size, long runs (d = {t['hidden_size']}, {t['tokens']:,} tokens, rho {t['rho']:g})", "",
             "| n_e | K | eta | N_n | val loss (seed mean, min..max) | seeds |", "|---|---|---|---|---|---|"]
    for p in t["points"]:
        lines.append(f"| {p['num_sets']} | {p['top_k']} | {p['eta']:.3g} | {p['token_params']:.3g} | "
                     f"{p['val_loss_mean']:.4f} ({p['val_loss_min']:.3f}..{p['val_loss_max']:.3f}) | {p['seeds']} |")
    if "backbone_alone_val_loss" in t:
        lines.append(f"| backbone alone | | 0 | 0 | {_ls(t['backbone_alone_val_loss'])} | |")
    if "fit" in t:
        f = t["fit"]
        sp = t.get("slope_spread")
        per = (f"; per seed {sp['mean']:+.4f} ({sp['min']:+.4f}..{sp['max']:+.4f}), R^2 "
               f"{t['r2_spread']['min']:.3f}..{t['r2_spread']['max']:.3f}") if sp else ""
        lines += ["", f"Loss per doubling of N_n: {f['slope_per_doubling']:+.4f} (R^2 {f['r2']:.3f}, seed means, "
                  f"{f['points']} sizes){per}; paper {t['paper_slope_per_doubling']:+.4f} (R^2 {t['paper_r2']})."]
    return lines


def _demo_markdown(d: dict[str, Any] | None) -> list[str]:
    if not d:
        return []
    lines = ["", "## The demo recipe with the configs' defaults (validation loss)", "",
             "| variant | val loss (mean, min..max) | vs backbone (paired by seed) | seeds |", "|---|---|---|---|"]
    for v, label in (("none", "backbone"), ("jtok", "+ JTok"), ("jtokm", "+ JTok-M")):
        if v in d:
            vs = d[v].get("vs_backbone")
            lines.append(f"| {label} | {_ls(d[v])} | {_pct(vs['mean']) if vs else ''} | {d[v]['seeds']} |")
    return lines
