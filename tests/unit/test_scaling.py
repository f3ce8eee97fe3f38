"""The scaling-law analysis on synthetic runs drawn from a known law with a known gamma."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from jtok_train.analysis.scaling import (
    Frontier,
    ScalingError,
    analyze,
    compare_frontiers,
    compute_saving,
    fit_loss_law,
    load_records,
)

TRUE = dict(E=1.8, A=400.0, alpha=0.34, B=410.0, beta=0.28)


def true_loss(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def _rec(name, variant, n, d, loss, eta=0.0, rho=0.0, budget=None, **extra):
    return {"name": name, "variant": variant, "seed": 0, "hidden_size": 0, "num_layers": 0, "active_params": int(n),
            "token_params": int(eta * n), "eta": eta, "rho": rho, "num_sets": 5, "top_k": 2,
            "flops_per_token": 6.0 * n, "tokens": int(d), "compute": 6.0 * n * d, "val_loss": float(loss),
            "train_loss": float(loss), "wall_s": 1.0, "step_time_s": 0.1, "budget": budget,
            "group": "isoflop" if budget else "eta_sweep", **extra}


def isoflop_runs(gamma=0.08, eta=5.0, rho=0.25, noise=0.0, seed=0, budgets=(1e16, 3e16, 1e17, 3e17, 1e18)):
    """Baseline and JTok-M runs on 5 iso-FLOP budgets x 5 sizes; JTok-M loss = law(N_c (1 + eta gamma), D)."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        n_opt = (c / 6) ** 0.5 / 20
        for i, n in enumerate(n_opt * np.geomspace(0.25, 4, 5)):
            d = c / (6 * n)
            for variant, k in (("none", 1.0), ("jtokm", 1 + eta * gamma)):
                loss = true_loss(n * k, d) * (1 + noise * rng.standard_normal())
                runs.append(_rec(f"{variant}_c{c:.0e}_{i}", variant, n, d, loss,
                                 eta=eta if variant != "none" else 0.0, rho=rho if variant != "none" else 0.0,
                                 budget=c))
    return runs


def test_recovers_law_and_gamma_without_noise():
    runs = isoflop_runs(gamma=0.08, eta=5.0)
    law = fit_loss_law(runs)
    assert law.form == "nd" and law.runs == 25
    assert law.alpha == pytest.approx(TRUE["alpha"], rel=0.02)
    assert law.beta == pytest.approx(TRUE["beta"], rel=0.02)
    assert law.E == pytest.approx(TRUE["E"], rel=0.02)
    assert law.rmse < 1e-4
    res = analyze(runs, bootstrap=20)
    assert all(r["gamma"] == pytest.approx(0.08, rel=0.02) for r in res["runs"])
    (pool,) = res["pooled"]
    assert pool["variant"] == "jtokm" and pool["rho"] == 0.25 and pool["runs"] == 25
    assert pool["gamma"] == pytest.approx(0.08, rel=0.01)
    assert pool["compute_saving"][0]["saving"] == pytest.approx(1 - 1 / 1.4, rel=0.01)
    # iso-FLOP: at equal loss the frontier of a model with N_eff = 1.4 N_c needs 1/1.4 of the compute
    (cmp,) = res["isoflop"]["comparisons"]
    assert cmp["compute_saving"] == pytest.approx(1 - 1 / 1.4, abs=0.03)
    assert 0 < cmp["lower_loss"] < 0.1
    assert res["isoflop"]["frontiers"]["none"]["slope"] < 0


@pytest.mark.parametrize("gamma,eta", [(0.05, 10.0), (0.2, 2.0)])
def test_recovers_gamma_with_noise(gamma, eta):
    runs = isoflop_runs(gamma=gamma, eta=eta, noise=0.002, seed=3)
    res = analyze(runs, bootstrap=50)
    (pool,) = res["pooled"]
    assert pool["gamma"] == pytest.approx(gamma, rel=0.15)
    # the bootstrap interval is a real spread around the pooled value
    assert pool["gamma_p16"] < pool["gamma"] < pool["gamma_p84"]
    assert pool["gamma_std"] > 0
    assert pool["compute_saving"][0]["saving"] == pytest.approx(compute_saving(eta, gamma), abs=0.04)


def test_fixed_backbone_eta_sweep_uses_n_only_law():
    """Baselines at 4 sizes and one token count, JTok-M at one size and several etas (the paper's table sweep)."""
    d = 2e9
    runs = [_rec(f"base{i}", "none", n, d, true_loss(n, d)) for i, n in enumerate([2e7, 5e7, 1e8, 3e8])]
    gammas = {}
    for rho, gamma in ((0.25, 0.03), (0.4, 0.05)):
        for eta in (10.0, 20.0, 40.0):
            runs.append(_rec(f"m_{rho}_{eta}", "jtokm", 5e7, d, true_loss(5e7 * (1 + eta * gamma), d), eta=eta,
                             rho=rho, budget=None))
        gammas[rho] = gamma
    res = analyze(runs, bootstrap=0)
    assert res["law"]["form"] == "n"
    assert "isoflop" not in res
    for p in res["pooled"]:
        assert p["gamma"] == pytest.approx(gammas[p["rho"]], rel=0.02)
        assert [s["eta"] for s in p["compute_saving"]] == [10.0, 20.0, 40.0]


def test_paper_frontiers():
    """PAPER.md's iso-FLOP lines: 2.2% lower loss at equal compute in the studied range (3e18..3e20)."""
    base = Frontier("none", -0.2016, 5.1334, 1.0)
    jtokm = Frontier("jtokm", -0.2009, 5.0881, 1.0)
    c = compare_frontiers(base, jtokm, 3e19)
    assert c["lower_loss"] == pytest.approx(0.022, abs=0.001)
    # consistency: the other model's loss at the compute it needs for the base loss is the base loss
    assert jtokm.loss(c["compute_ratio"] * 3e19) == pytest.approx(c["base_loss"], rel=1e-9)
    assert 0.25 < c["compute_saving"] < 0.40


def test_degenerate_inputs_give_clear_errors():
    runs = isoflop_runs()
    with pytest.raises(ScalingError, match="no baseline runs"):
        analyze([r for r in runs if r["variant"] != "none"])
    one = [r for r in runs if r["variant"] != "none" or r["active_params"] == runs[0]["active_params"]]
    with pytest.raises(ScalingError, match="one size"):
        analyze(one)
    with pytest.raises(ScalingError, match="no JTok"):
        analyze([r for r in runs if r["variant"] == "none"])
    with pytest.raises(ScalingError, match="law=.bogus. is invalid"):
        fit_loss_law(runs, "bogus")
    two_sizes = [r for r in runs if r["variant"] == "none"][:2]
    with pytest.raises(ScalingError, match="law=n needs"):
        fit_loss_law(two_sizes, "n")
    assert fit_loss_law(two_sizes).form == "power"


@pytest.mark.e2e
def test_records_from_tree_and_jsonl_and_cli(tmp_path):
    runs = isoflop_runs(gamma=0.1, eta=4.0)
    for i, r in enumerate(runs[:30]):
        (tmp_path / "tree" / f"run{i}" / "sub").mkdir(parents=True)
        (tmp_path / "tree" / f"run{i}" / "sub" / "result.json").write_text(json.dumps(dict(r, extra_key=[1, 2])))
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(r) for r in runs[30:]) + "\n\n")
    recs = load_records([tmp_path / "tree", tmp_path / "more.jsonl"])
    assert len(recs) == len(runs) and recs[0]["extra_key"] == [1, 2]
    proc = subprocess.run([sys.executable, "-m", "jtok_train.cli.scaling", str(tmp_path / "tree"),
                           str(tmp_path / "more.jsonl"), "format=json", "bootstrap=10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["pooled"][0]["gamma"] == pytest.approx(0.1, rel=0.01)
    table = subprocess.run([sys.executable, "-m", "jtok_train.cli.scaling", str(tmp_path / "more.jsonl"),
                            str(tmp_path / "tree")], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "pooled gamma" in table.stdout and "less compute" in table.stdout
    # bad inputs: one line each, exit 2
    bad = dict(runs[0])
    del bad["val_loss"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    for args, msg in (([str(tmp_path / "bad.json")], "lacks ['val_loss']"),
                      ([str(tmp_path / "nope")], "no such file"),
                      ([str(tmp_path / "more.jsonl"), "law=xx"], "law='xx'"),
                      ([str(tmp_path / "more.jsonl"), "colour=red"], "unknown option")):
        p = subprocess.run([sys.executable, "-m", "jtok_train.cli.scaling", *args], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert math.isfinite(out["law"]["alpha"]) and out["warnings"] == []
    # the same run twice (e.g. a pilot directory next to the study): a warning naming both places
    (tmp_path / "tree" / "copy").mkdir()
    (tmp_path / "tree" / "copy" / "result.json").write_text(json.dumps(runs[0]))
    res = analyze(load_records([tmp_path / "tree", tmp_path / "more.jsonl"]), bootstrap=0)
    assert len(res["warnings"]) == 1 and runs[0]["name"] in res["warnings"][0]
