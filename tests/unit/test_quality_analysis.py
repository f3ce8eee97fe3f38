"""The iso-FLOP study's fits (benchmarks/quality/analysis.py) on synthetic U-curves with a known answer."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "quality"))

from analysis import (  # noqa: E402
    analyze,
    compute_ratio,
    fit_frontier,
    fit_loglinear,
    fit_ucurve,
    loss_gap,
    summary_markdown,
)

SLOPE, K = -0.05, 12.0          # L_opt(C) = K * C^SLOPE for the baseline
GAIN = 1.6                      # the other variant: L(C) = L_base(C * GAIN) (a compute multiplier)


def _l_opt(c: float, gain: float = 1.0) -> float:
    return K * (c * gain) ** SLOPE


def _n_opt(c: float) -> float:
    return 0.02 * c ** 0.5


def _u_loss(n: float, c: float, gain: float = 1.0, curv: float = 0.15) -> float:
    """A U-curve in ln N around the budget's optimum."""
    return _l_opt(c, gain) + curv * (math.log(n) - math.log(_n_opt(c))) ** 2


def _records(rng, seeds=(1, 2), noise=0.0):
    recs = []
    budgets = [1e11, 4e11, 1.6e12, 6.4e12]
    for seed in seeds:
        for c in budgets:
            for variant, gain in (("none", 1.0), ("jtokm", GAIN), ("jtok", 1.2)):
                for f in (0.25, 0.5, 1.0, 2.0, 4.0):
                    n = _n_opt(c) * f * rng.uniform(0.9, 1.1)
                    recs.append({"name": f"{variant}_{c}_{f}_{seed}", "group": "isoflop", "variant": variant,
                                 "seed": seed, "budget": c, "active_params": n, "hidden_size": int(f * 64),
                                 "val_loss": _u_loss(n, c, gain) + rng.normal(0, noise)})
    return recs, budgets


def test_ucurve_recovers_the_vertex():
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = 10 ** rng.uniform(10, 14)
        ns = _n_opt(c) * np.exp(rng.uniform(-1.5, 1.5, size=5))
        ns[0], ns[1] = _n_opt(c) * 0.3, _n_opt(c) * 3.0     # the optimum lies inside the samples
        u = fit_ucurve(ns, [_u_loss(n, c) for n in ns])
        assert u["interior"]
        assert u["n_opt"] == pytest.approx(_n_opt(c), rel=1e-6)
        assert u["loss_opt"] == pytest.approx(_l_opt(c), rel=1e-9)


def test_ucurve_optimum_outside_the_sizes_is_an_edge():
    c = 1e12
    ns = _n_opt(c) * np.array([2.0, 4.0, 8.0])               # all larger than the optimum: loss rises
    u = fit_ucurve(ns, [_u_loss(n, c) for n in ns])
    assert not u["interior"]
    assert u["n_opt"] == pytest.approx(ns[0], rel=1e-6)
    assert u["loss_opt"] == pytest.approx(_u_loss(ns[0], c), rel=1e-9)
    with pytest.raises(ValueError, match="3 or more distinct sizes"):
        fit_ucurve([1e5, 1e5, 2e5], [3.0, 3.1, 3.2])


def test_frontier_compute_ratio_and_gap():
    cs = [1e11, 1e12, 1e13]
    base = fit_frontier(cs, [_l_opt(c) for c in cs])
    other = fit_frontier(cs, [_l_opt(c, GAIN) for c in cs])
    assert base["slope"] == pytest.approx(SLOPE, rel=1e-9)
    assert base["intercept"] == pytest.approx(math.log10(K), rel=1e-9)
    assert base["log2_a"] == pytest.approx(SLOPE / math.log10(2), rel=1e-9)
    assert base["r2"] == pytest.approx(1.0)
    for c in (3e11, 5e12):
        assert compute_ratio(base, other, c) == pytest.approx(1 / GAIN, rel=1e-9)
        assert loss_gap(base, other, c) == pytest.approx(GAIN ** SLOPE - 1, rel=1e-9)
    # the paper's frontiers (log2 L = a log10 C + b), solved by hand in log2 space at C = 10^19.5: the loss
    # gap is its -2.2%; the compute ratio of its rounded coefficients is 0.70 (it reports 35.2% saved)
    f_b = {"slope": -0.2016 * math.log10(2), "intercept": 5.1334 * math.log10(2)}
    f_m = {"slope": -0.2009 * math.log10(2), "intercept": 5.0881 * math.log10(2)}
    x = 19.5
    x_m = (5.0881 - 5.1334 + 0.2016 * x) / 0.2009
    assert compute_ratio(f_b, f_m, 10 ** x) == pytest.approx(10 ** (x_m - x), rel=1e-9)
    assert loss_gap(f_b, f_m, 10 ** x) == pytest.approx(2 ** ((0.2016 - 0.2009) * x + 5.0881 - 5.1334) - 1, rel=1e-9)
    assert loss_gap(f_b, f_m, 10 ** x) == pytest.approx(-0.022, abs=0.001)


def test_loglinear_slope():
    rng = np.random.default_rng(1)
    x = 2.0 ** np.arange(20, 25) * rng.uniform(0.95, 1.05, 5)
    fit = fit_loglinear(x, 4.0 - 0.0118 * np.log2(x))
    assert fit["slope_per_doubling"] == pytest.approx(-0.0118, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)


def test_analyze_end_to_end_with_seed_noise():
    rng = np.random.default_rng(2)
    recs, budgets = _records(rng, noise=0.002)
    # table-size sweep: rho = 0.25 fixed (2 seeds, +-0.01 around the truth) and K = 2 fixed (seed 1)
    def eta_rec(ne, k, seed, loss):
        return {"name": f"eta{ne}_{k}_{seed}", "group": "eta_sweep", "variant": "jtokm", "seed": seed, "num_sets": ne,
                "top_k": k, "rho": k / ne, "eta": ne * 2.0, "token_params": ne * 1_000_000, "active_params": 500_000,
                "hidden_size": 32, "num_layers": 4, "tokens": 1000, "val_loss": loss}

    def on_line(ne):
        return 5.0 - 0.02 * math.log2(ne * 1_000_000)

    for ne, k in ((4, 1), (8, 2), (16, 4), (32, 8)):
        recs += [eta_rec(ne, k, 1, on_line(ne) + 0.01), eta_rec(ne, k, 2, on_line(ne) - 0.01)]
    recs += [eta_rec(4, 2, 1, on_line(8) + 0.03 + 0.01), eta_rec(16, 2, 1, on_line(8) - 0.03 + 0.01)]
    recs += [{"name": f"ref{s}", "group": "other", "variant": "none", "seed": s, "hidden_size": 32, "num_layers": 4,
              "tokens": 1000, "val_loss": 6.0 + s, "active_params": 500_000} for s in (1, 2, 3)]
    out = analyze(recs)
    assert out["seeds"] == [1, 2] and out["budgets"] == budgets
    truth_saving, truth_gap = 1 - 1 / GAIN, GAIN ** SLOPE - 1
    comp = out["seed_mean"]["comparison"]["jtokm"]
    assert comp["compute_saving_mid"] == pytest.approx(truth_saving, abs=0.06)
    assert comp["loss_gap_mid"] == pytest.approx(truth_gap, abs=0.002)
    spread = out["seed_spread"]["jtokm"]["loss_gap_mid"]
    assert spread["n"] == 2 and spread["min"] <= spread["mean"] <= spread["max"]
    assert out["seed_mean"]["fits"]["none"]["frontier"]["slope"] == pytest.approx(SLOPE, abs=0.005)
    assert all(u["interior"] for u in out["seed_mean"]["fits"]["none"]["ucurves"].values())
    sw = out["eta_sweep"]
    assert sw["rho_fixed"]["rho"] == 0.25 and sw["rho_fixed"]["seeds"] == [1, 2]
    assert sw["fit"]["slope_per_doubling"] == pytest.approx(-0.02, rel=1e-9)
    assert sw["fit"]["r2"] == pytest.approx(1.0)
    assert sw["k_fixed"]["top_k"] == 2
    assert [p["token_params"] for p in sw["k_fixed"]["points"]] == [4_000_000, 8_000_000, 16_000_000]
    # K = 2 series: (4,2) and (16,2) of seed 1, (8,2) averaged over both seeds (on the line)
    assert sw["k_fixed"]["fit"]["slope_per_doubling"] == pytest.approx(-0.03, abs=0.004)
    assert sw["backbone_alone_seeds"] == [1, 2]           # the sweep's seeds, not seed 3
    assert sw["backbone_alone_val_loss"]["mean"] == pytest.approx(7.5)
    md = summary_markdown(out)
    assert "JTok-M: compute saved" in md and "per doubling" in md


def test_seed_mean_uses_the_seeds_with_a_whole_grid():
    rng = np.random.default_rng(3)
    recs, _ = _records(rng, noise=0.0)
    # seed 2 of JTok-M stops half-way: its mean uses seed 1 only, the baseline's both seeds
    recs = [r for r in recs if not (r["variant"] == "jtokm" and r["seed"] == 2 and r["budget"] > 1e12)]
    for r in recs:
        if r["variant"] == "jtokm" and r["seed"] == 1:
            r["val_loss"] += 0.5
    out = analyze(recs)
    assert out["seed_mean_seeds"] == {"none": [1, 2], "jtok": [1, 2], "jtokm": [1]}
    cells = [row for row in out["losses"] if row["variant"] == "jtokm"]
    assert all(row["seeds"] == 1 for row in cells)
    # every jtokm cell is seed 1's loss (shifted by 0.5), none mixed with seed 2's
    truth = {(r["budget"], r["hidden_size"]): r["val_loss"] for r in recs if r["variant"] == "jtokm" and r["seed"] == 1}
    for row in cells:
        assert row["val_loss_mean"] == pytest.approx(truth[(row["budget"], row["hidden_size"])])


def _rec(**kw) -> dict:
    base = {"variant": "jtokm", "seed": 1, "hidden_size": 16, "num_layers": 4, "tokens": 2_097_152, "rho": 0.25,
            "eta": 1.0, "active_params": 88_700.0}
    return {**base, **kw}


def test_table_sweep_fits_the_slope_per_doubling_on_seed_means_and_per_seed():
    """Losses on an exact line in log2 N_n, the seeds offset by +-0.01: the slope comes back on the seed means
    and per seed, R^2 1, and the backbone alone is reported beside it."""
    from analysis import table_sweep

    rng = np.random.default_rng(0)
    slope = float(rng.uniform(-0.05, -0.01))
    recs = []
    for seed, off in ((1, -0.01), (2, 0.01)):
        recs.append(_rec(name=f"b{seed}", group="table_sweep", variant="none", seed=seed, token_params=0, val_loss=5.0 + off))
        for ne in (8, 16, 32, 64):
            n = 262_144 * ne
            recs.append(_rec(name=f"t{ne}_{seed}", group="table_sweep", seed=seed, num_sets=ne, top_k=ne // 4,
                             token_params=n, val_loss=4.9 + off + slope * math.log2(n / 2**21)))
    recs.append(_rec(name="other", group="eta_sweep", num_sets=4, top_k=1, token_params=1, val_loss=9.0))
    t = table_sweep(recs)
    assert len(t["points"]) == 4 and t["points"][0]["seeds"] == [1, 2]
    assert t["fit"]["slope_per_doubling"] == pytest.approx(slope, abs=1e-9) and t["fit"]["r2"] == pytest.approx(1.0)
    assert t["slope_spread"]["min"] == pytest.approx(slope, abs=1e-9) == t["slope_spread"]["max"]
    assert t["backbone_alone_val_loss"]["mean"] == pytest.approx(5.0)
    md = summary_markdown({**analyze(recs), "table_sweep": t})
    assert f"{slope:+.4f}" in md and "-0.0118" in md


def test_pilot_table_pairs_each_setting_with_the_backbone_of_its_seed():
    from analysis import pilot_table

    recs = [
        {"name": "b1", "group": "pilot", "backbone": "moe", "variant": "none", "seed": 1, "val_loss": 5.0},
        {"name": "b2", "group": "pilot", "backbone": "moe", "variant": "none", "seed": 2, "val_loss": 6.0},
        {"name": "j1", "group": "pilot", "backbone": "moe", "variant": "jtok", "seed": 1, "val_loss": 4.9,
         "jtok_init": {"scale_init": 1.0, "table_init_std": 0.005, "scale_lr_mult": 10.0}},
        {"name": "j2", "group": "pilot", "backbone": "moe", "variant": "jtok", "seed": 2, "val_loss": 5.7,
         "jtok_init": {"scale_init": 1.0, "table_init_std": 0.005, "scale_lr_mult": 10.0}},
        {"name": "d1", "group": "pilot", "backbone": "dense", "variant": "none", "seed": 1, "val_loss": 5.5},
    ]
    rows = pilot_table(recs)
    assert [r["backbone"] for r in rows] == ["moe", "moe", "dense"]
    j = rows[1]
    assert j["setting"] == {"scale_init": 1.0, "table_init_std": 0.005, "scale_lr_mult": 10.0}
    # per seed: 4.9/5.0 - 1 = -2%, 5.7/6.0 - 1 = -5% (not the ratio of the means, -3.6%)
    assert j["vs_backbone"]["min"] == pytest.approx(-0.05) and j["vs_backbone"]["max"] == pytest.approx(-0.02)
    assert j["vs_backbone"]["mean"] == pytest.approx(-0.035)


def test_demo_losses_pair_each_variant_with_the_backbone_of_its_seed():
    from analysis import demo_losses

    recs = [{"name": f"{v}{s}", "group": "demo", "variant": v, "seed": s, "val_loss": x}
            for v, s, x in (("none", 1, 5.0), ("none", 2, 4.0), ("jtok", 1, 4.5), ("jtok", 2, 3.8),
                            ("jtokm", 1, 4.0))]
    d = demo_losses(recs + [{"name": "x", "group": "pilot", "variant": "none", "seed": 1, "val_loss": 9.0}])
    assert d["none"]["mean"] == pytest.approx(4.5) and d["none"]["seeds"] == [1, 2]
    # -10% and -5% per seed
    assert d["jtok"]["vs_backbone"]["min"] == pytest.approx(-0.10) and d["jtok"]["vs_backbone"]["max"] == pytest.approx(-0.05)
    assert d["jtokm"]["vs_backbone"]["mean"] == pytest.approx(-0.20) and d["jtokm"]["seeds"] == [1]
