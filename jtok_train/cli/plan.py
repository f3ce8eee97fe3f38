"""jtok-plan: parameter and FLOP accounting of a config, counted on the instantiated (meta) model.

    jtok-plan model=moe_17b_a2b jtok=jtokm            # a table
    jtok-plan model=dense_s jtok=jtok format=json     # JSON
"""

from __future__ import annotations

import json
import logging
import sys
import warnings


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.3f}{unit}"
    return f"{n:,.0f}"


def compute_plan(overrides: list[str]) -> dict:
    from jtok_train.compat import destroy_model_parallel, init_distributed, init_model_parallel
    from jtok_train.config import compose, validate
    from jtok_train.model.accounting import formula_params, plan
    from jtok_train.model.builder import build_model, build_transformer_config

    cfg = compose(overrides)
    validate(cfg)
    init_distributed()
    # Count at world size 1: every expert and every table row is local.
    init_model_parallel()
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.expert_model_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    model = build_model(cfg, config=build_transformer_config(cfg, perform_initialization=False), device="meta")
    out = plan(cfg, model)
    out["formula_matches_count"] = formula_params(cfg).total_params == out["total_params"]
    destroy_model_parallel()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    fmt = "table"
    overrides = []
    for a in argv:
        if a.startswith("format="):
            fmt = a.split("=", 1)[1]
        else:
            overrides.append(a)
    if fmt not in ("table", "json"):
        print(f"jtok-plan: format={fmt!r} is invalid: use format=table or format=json", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from jtok_train.config import ConfigError

    try:
        out = compute_plan(overrides)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        msg = str(e).strip().replace("\n", " ")
        print(f"jtok-plan: bad config: {msg}", file=sys.stderr)
        return 2
    if fmt == "json":
        keys = ["backbone_params", "active_params", "token_params", "total_params", "eta", "rho", "flops_per_token"]
        print(json.dumps({k: out[k] for k in keys} | {k: v for k, v in out.items() if k not in keys}, indent=2))
        return 0
    rows = [
        ("model / jtok", f"{out['model']} / {out['jtok']}"),
        ("backbone params (all experts)", _fmt(out["backbone_params"])),
        ("activated params N_c", _fmt(out["active_params"])),
        ("token-indexed params N_n", _fmt(out["token_params"])),
        ("JTok dense params (scales, routers)", _fmt(out["jtok_dense_params"])),
        ("total params", _fmt(out["total_params"])),
        ("eta = N_n / N_c", f"{out['eta']:.3f}"),
        ("rho = K / n_e", f"{out['rho']:.3f}"),
        ("training FLOPs per token", f"{out['flops_per_token']:.4g}"),
        ("counted on", out["counted"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
