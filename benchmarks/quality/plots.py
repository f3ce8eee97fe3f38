"""The study's figures (matplotlib, Agg, ~100 dpi): loss curves, iso-FLOP U-curves and frontiers, loss vs eta."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

COLORS = {"none": "tab:gray", "jtok": "tab:blue", "jtokm": "tab:red"}
LABELS = {"none": "MoE backbone", "jtok": "+ JTok", "jtokm": "+ JTok-M"}
MARKERS = ["o", "s", "^", "D", "v", "P"]
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
            ax.plot(x, _smooth(y, max(1, n // 20)), color=COLORS[v], lw=1.2, label=f"{LABELS[v]} (val {vl:.3f})")
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
            ax1.plot(xs, ys, MARKERS[bi % len(MARKERS)], color=COLORS[v], ms=5,
                     label=f"{LABELS[v]}" if bi == 0 else None)
            u = fits.get(v, {}).get("ucurves", {}).get(f"{c:.4g}")
            if u:
                grid = np.linspace(np.log(min(xs)), np.log(max(xs)), 50)
                ax1.plot(np.exp(grid), np.polyval(u["coef"], grid), "-", color=COLORS[v], lw=0.8, alpha=0.7)
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
        ax2.plot(cs, [us[c]["loss_opt"] for c in us], "o", color=COLORS[v], label=LABELS[v])
        f = entry.get("frontier")
        if f:
            xx = np.geomspace(min(cs) / 1.3, max(cs) * 1.3, 20)
            ax2.plot(xx, 10 ** (f["intercept"] + f["slope"] * np.log10(xx)), "-", color=COLORS[v], lw=1,
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
    p = sw["points"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.array([q["token_params"] for q in p], dtype=float)
    y = np.array([q["val_loss"] for q in p])
    ax.plot(x, y, "o", color=COLORS["jtokm"], label="+ JTok-M")
    for q in p:
        ax.annotate(f"n_e={q['num_sets']},K={q['top_k']}\neta={q['eta']:.0f}", (q["token_params"], q["val_loss"]),
                    fontsize=6, xytext=(3, 3), textcoords="offset points")
    if "fit" in sw:
        f = sw["fit"]
        xx = np.geomspace(x.min() / 1.2, x.max() * 1.2, 20)
        ax.plot(xx, f["intercept"] + f["slope_per_doubling"] * np.log2(xx), "-", color=COLORS["jtokm"], lw=1,
                label=f"{f['slope_per_doubling']:+.4f} per doubling (R^2 {f['r2']:.2f}); paper -0.0118")
    if "backbone_alone_val_loss" in sw:
        ax.axhline(sw["backbone_alone_val_loss"]["mean"], color=COLORS["none"], ls="--", lw=1, label="backbone alone")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("JTok-M table parameters N_n", fontsize=8)
    ax.set_ylabel("validation loss", fontsize=8)
    ax.set_title("loss vs table size (fixed backbone and tokens, rho 0.25)", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def make_plots(records: list[dict], out: dict[str, Any] | None, plots_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    plots_dir.mkdir(parents=True, exist_ok=True)
    made = [loss_curves(records, plots_dir / "loss_curves.png"),
            isoflop(records, out, plots_dir / "isoflop.png"),
            eta_plot(out, plots_dir / "loss_vs_eta.png")]
    return [p for p in made if p is not None]
