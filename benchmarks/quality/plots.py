"""The study's figures (matplotlib, Agg, ~100 dpi): loss curves, iso-FLOP U-curves and frontiers, loss vs eta."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

COLORS = {"none": "tab:gray", "jtok": "tab:blue", "jtokm": "tab:red"}
LABELS = {"none": "MoE backbone", "jtok": "+ JTok", "jtokm": "+ JTok-M"}
MARKERS = ["o", "s", "^", "D", "v", "P"]
STYLE = {"none": "-", "jtok": "--", "jtokm": "-"}     # JTok dashed: it lies on the backbone's curves
DPI = 100


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or y.size < w:
        return y
    k = np.ones(w) / w
    return np.convolve(np.pad(y, (w - 1, 0), mode="edge"), k, mode="valid")


def loss_curves(records: list[dict], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    iso = [r for r in records if r.get("group") == "isoflop" and r.get("train_losses")]
    if not iso:
        return None
    top = max(r["budget"] for r in iso)
    widths = sorted({r["hidden_size"] for r in iso if r["budget"] == top})
    fig, axes = plt.subplots(1, len(widths), figsize=(3.6 * len(widths), 3.3), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], widths):
        for v in ("none", "jtok", "jtokm"):
            rs = [r for r in iso if r["budget"] == top and r["hidden_size"] == d and r["variant"] == v]
            if not rs:
                continue
            n = min(len(r["train_losses"]) for r in rs)
            y = np.mean([r["train_losses"][:n] for r in rs], axis=0)
            x = np.arange(1, n + 1) * rs[0]["tokens"] / len(rs[0]["train_losses"]) / 1e3
            vl = np.mean([r["val_loss"] for r in rs])
            ax.plot(x, _smooth(y, max(1, n // 20)), STYLE[v], color=COLORS[v], lw=1.2,
                    label=f"{LABELS[v]} (val {vl:.3f})")
        ax.set_title(f"d={d}, C={top:.2g} FLOPs", fontsize=9)
        ax.set_xlabel("training tokens (thousands)", fontsize=8)
        ax.set_ylim(top=7.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("train loss (nats/token, smoothed, seed mean)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def isoflop(records: list[dict], out: dict[str, Any] | None, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    iso = [r for r in records if r.get("group") == "isoflop"]
    if not iso:
        return None
    budgets = sorted({float(r["budget"]) for r in iso})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    pts: dict[tuple, list[float]] = defaultdict(list)
    for r in iso:
        pts[(r["variant"], float(r["budget"]), float(r["active_params"]))].append(float(r["val_loss"]))
    fits = (out or {}).get("seed_mean", {}).get("fits", {})
    for v in ("none", "jtok", "jtokm"):
        for bi, c in enumerate(budgets):
            xs = sorted(n for (vv, cc, n) in pts if vv == v and cc == c)
            if not xs:
                continue
            ys = [np.mean(pts[(v, c, n)]) for n in xs]
            ax1.plot(xs, ys, MARKERS[bi % len(MARKERS)], color=COLORS[v], ms=5 if v != "jtok" else 7,
                     mfc=COLORS[v] if v != "jtok" else "none", label=f"{LABELS[v]}" if bi == 0 else None)
            u = fits.get(v, {}).get("ucurves", {}).get(f"{c:.4g}")
            if u:
                grid = np.linspace(np.log(min(xs)), np.log(max(xs)), 50)
                ax1.plot(np.exp(grid), np.polyval(u["coef"], grid), STYLE[v], color=COLORS[v], lw=0.8, alpha=0.7)
                ax1.plot([u["n_opt"]], [u["loss_opt"]], "*", color=COLORS[v], ms=9, mec="k", mew=0.5)
    ax1.set_xscale("log")
    ax1.set_xlabel("active backbone parameters N_c", fontsize=8)
    ax1.set_ylabel("validation loss (seed mean)", fontsize=8)
    ax1.set_title("U-curves (markers: budgets " + ", ".join(f"{c:.2g}" for c in budgets) + "; *: fitted optimum)",
                  fontsize=8)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3, which="both")
    for v in ("none", "jtok", "jtokm"):
        entry = fits.get(v, {})
        us = entry.get("ucurves", {})
        if not us:
            continue
        cs = [float(c) for c in us]
        ax2.plot(cs, [us[c]["loss_opt"] for c in us], "o", color=COLORS[v], label=LABELS[v],
                 mfc=COLORS[v] if v != "jtok" else "none", ms=5 if v != "jtok" else 7)
        f = entry.get("frontier")
        if f:
            xx = np.geomspace(min(cs) / 1.3, max(cs) * 1.3, 20)
            ax2.plot(xx, 10 ** (f["intercept"] + f["slope"] * np.log10(xx)), STYLE[v], color=COLORS[v], lw=1,
                     label=f"log2 L = {f['log2_a']:.3f} log10 C + {f['log2_b']:.3f}")
    comp = (out or {}).get("seed_mean", {}).get("comparison", {}).get("jtokm")
    title = "iso-FLOP frontiers (seed-mean fit)"
    if comp:
        title += f": JTok-M saves {100 * comp['compute_saving_mid']:.0f}% compute, loss {100 * comp['loss_gap_mid']:+.1f}%"
    ax2.set_title(title, fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training compute C (FLOPs)", fontsize=8)
    ax2.set_ylabel("optimal validation loss L_opt", fontsize=8)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, which="both")
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def eta_plot(out: dict[str, Any] | None, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    sw = (out or {}).get("eta_sweep")
    if not sw:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    series = [("rho_fixed", "tab:red", "o"), ("k_fixed", "tab:purple", "s")]
    xs_all = []
    for key, color, marker in series:
        ser = sw.get(key)
        if not ser:
            continue
        pts = ser["points"]
        x = np.array([p["token_params"] for p in pts], dtype=float)
        y = np.array([p["val_loss_mean"] for p in pts])
        err = np.array([[p["val_loss_mean"] - p["val_loss_min"] for p in pts],
                        [p["val_loss_max"] - p["val_loss_mean"] for p in pts]])
        what = f"rho {ser['rho']:g}" if key == "rho_fixed" else f"K {ser['top_k']}"
        ax.errorbar(x, y, yerr=err, fmt=marker, color=color, ms=5, capsize=3,
                    label=f"+ JTok-M, {what} (seeds {ser['seeds']})")
        xs_all += list(x)
        if "fit" in ser:
            f = ser["fit"]
            xx = np.geomspace(x.min() / 1.15, x.max() * 1.15, 20)
            ax.plot(xx, f["intercept"] + f["slope_per_doubling"] * np.log2(xx), "-", color=color, lw=1,
                    label=f"{f['slope_per_doubling']:+.4f} per doubling (R^2 {f['r2']:.2f})")
    for p in sw["points"]:
        if p["seed"] == min(q["seed"] for q in sw["points"]):
            ax.annotate(f"{p['num_sets']}/{p['top_k']}", (p["token_params"], p["val_loss"]), fontsize=6,
                        xytext=(4, -8), textcoords="offset points")
    if "backbone_alone_val_loss" in sw:
        ax.axhline(sw["backbone_alone_val_loss"]["mean"], color=COLORS["none"], ls="--", lw=1,
                   label=f"backbone alone (seeds {sw['backbone_alone_seeds']})")
    return _save_table_axes(fig, ax, path, "validation loss (seed mean, min..max)",
                            "loss vs table size, fixed backbone (d=32) and tokens; paper: -0.0118 per doubling")


def _save_table_axes(fig, ax, path: Path, ylabel: str, title: str) -> Path:
    """The axes both table-size plots share (log2 N_n), then save and close."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xlabel("JTok-M table parameters N_n (labels: n_e/K)", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3, which="both")
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def table_plot(out: dict[str, Any] | None, path: Path) -> Path | None:
    """The long table-size sweep: loss vs N_n with its fit, and the paper's slope drawn through the fit's
    middle (the paper's losses are at another scale: only the slope compares)."""
    import matplotlib.pyplot as plt

    t = (out or {}).get("table_sweep")
    if not t:
        return None
    pts = t["points"]
    x = np.array([p["token_params"] for p in pts], dtype=float)
    y = np.array([p["val_loss_mean"] for p in pts])
    err = np.array([[p["val_loss_mean"] - p["val_loss_min"] for p in pts],
                    [p["val_loss_max"] - p["val_loss_mean"] for p in pts]])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(x, y, yerr=err, fmt="o", color=COLORS["jtokm"], ms=5, capsize=3,
                label=f"+ JTok-M, rho {t['rho']:g} (seed mean, min..max)")
    for p in pts:
        ax.annotate(f"{p['num_sets']}/{p['top_k']}", (p["token_params"], p["val_loss_mean"]), fontsize=6,
                    xytext=(4, -8), textcoords="offset points")
    xx = np.geomspace(x.min() / 1.15, x.max() * 1.15, 20)
    if "fit" in t:
        f = t["fit"]
        ax.plot(xx, f["intercept"] + f["slope_per_doubling"] * np.log2(xx), "-", color=COLORS["jtokm"], lw=1,
                label=f"fit: {f['slope_per_doubling']:+.4f} per doubling (R^2 {f['r2']:.2f})")
        mid = np.exp(np.mean(np.log(x)))
        y_mid = f["intercept"] + f["slope_per_doubling"] * np.log2(mid)
        ax.plot(xx, y_mid + t["paper_slope_per_doubling"] * np.log2(xx / mid), ":", color="black", lw=1,
                label=f"paper's slope {t['paper_slope_per_doubling']:+.4f} (through the fit's middle)")
    if "backbone_alone_val_loss" in t:
        ax.axhline(t["backbone_alone_val_loss"]["mean"], color=COLORS["none"], ls="--", lw=1, label="backbone alone")
    return _save_table_axes(fig, ax, path, "validation loss",
                            f"loss vs table size: d={t['hidden_size']} MoE, {t['tokens'] / 1e6:.1f}M tokens per run")


def make_plots(records: list[dict], out: dict[str, Any] | None, plots_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    plots_dir.mkdir(parents=True, exist_ok=True)
    made = [loss_curves(records, plots_dir / "loss_curves.png"),
            isoflop(records, out, plots_dir / "isoflop.png"),
            eta_plot(out, plots_dir / "loss_vs_eta.png"),
            table_plot(out, plots_dir / "loss_vs_table_size.png")]
    return [p for p in made if p is not None]
