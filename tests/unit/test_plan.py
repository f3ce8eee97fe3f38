"""Parameter accounting: the count of the instantiated (meta) model equals the closed form, and the
paper's sizes come out within 2%."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jtok_train.testing import run_distributed

CASES = [
    ("tiny", "jtokm"), ("tiny_dense", "jtok"), ("dense_s", "none"), ("dense_s", "jtok"), ("dense_xl_1.5b", "jtok"),
    ("moe_1.5b_a250m", "jtok"), ("moe_1.5b_a250m", "jtokm"), ("moe_3.2b_a0.5b", "jtok"), ("moe_3.2b_a0.5b", "jtokm"),
    ("moe_17b_a2b", "jtokm"),
]


def _count_all(cases):
    from jtok_train.compat import init_model_parallel
    from jtok_train.config import compose
    from jtok_train.model.accounting import count_model, formula_params, plan
    from jtok_train.model.builder import build_model, build_transformer_config

    init_model_parallel()
    out = {}
    for model, jtok in cases:
        cfg = compose([f"model={model}", f"jtok={jtok}"])
        m = build_model(cfg, config=build_transformer_config(cfg, perform_initialization=False), device="meta")
        assert all(p.device.type == "meta" for p in m.parameters())
        counted, formula = count_model(m, cfg), formula_params(cfg)
        assert counted == formula, (model, jtok, counted, formula)
        out[f"{model}/{jtok}"] = plan(cfg, m)
    return out


@pytest.fixture(scope="module")
def plans():
    return run_distributed(_count_all, 1, CASES, timeout=300)[0]


def test_count_equals_formula_for_every_paper_config(plans):
    assert len(plans) == len(CASES)  # _count_all asserts count == formula for each


def test_paper_sizes_within_two_percent(plans):
    s = plans["dense_s/jtok"]
    assert s["backbone_params"] == pytest.approx(190e6, rel=0.02)
    assert s["token_params"] == pytest.approx(0.46e9, rel=0.02)
    assert s["total_params"] == pytest.approx(650e6, rel=0.02)
    big = plans["moe_17b_a2b/jtokm"]
    assert big["backbone_params"] == pytest.approx(17e9, rel=0.02)
    assert big["token_params"] == pytest.approx(43.6e9, rel=0.02)
    assert big["total_params"] == pytest.approx(61e9, rel=0.02)
    assert big["rho"] == pytest.approx(0.4)
    # the other configs' table sizes (PAPER.md's table)
    assert plans["dense_xl_1.5b/jtok"]["token_params"] == pytest.approx(6.5e9, rel=0.02)
    assert plans["dense_xl_1.5b/jtok"]["backbone_params"] == pytest.approx(1.5e9, rel=0.04)
    assert plans["moe_1.5b_a250m/jtok"]["token_params"] == pytest.approx(0.93e9, rel=0.02)
    assert plans["moe_1.5b_a250m/jtokm"]["token_params"] == pytest.approx(4.7e9, rel=0.02)
    assert plans["moe_1.5b_a250m/jtokm"]["backbone_params"] == pytest.approx(1.5e9, rel=0.02)
    assert plans["moe_3.2b_a0.5b/jtok"]["token_params"] == pytest.approx(2.1e9, rel=0.02)
    assert plans["moe_3.2b_a0.5b/jtokm"]["token_params"] == pytest.approx(10.5e9, rel=0.02)
    assert plans["moe_3.2b_a0.5b/jtokm"]["backbone_params"] == pytest.approx(3.2e9, rel=0.02)
    assert plans["moe_3.2b_a0.5b/jtokm"]["active_params"] == pytest.approx(0.5e9, rel=0.06)


def test_eta_and_flops_are_consistent(plans):
    for p in plans.values():
        assert p["eta"] == pytest.approx(p["token_params"] / p["active_params"])
        assert p["flops_per_token"] >= 6 * p["active_params"]
    assert plans["dense_s/none"]["token_params"] == 0 and plans["dense_s/none"]["eta"] == 0


def test_jtok_plan_cli_json():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "jtok_train.cli.plan", "model=moe_17b_a2b", "jtok=jtokm", "format=json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("backbone_params", "active_params", "token_params", "total_params", "eta", "rho", "flops_per_token"):
        assert key in out
    assert out["token_params"] == 28 * 5 * 152064 * 2048
    assert out["formula_matches_count"] is True
    bad = subprocess.run([sys.executable, "-m", "jtok_train.cli.plan", "jtok.top_k=9"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "jtok.top_k=9" in bad.stderr
