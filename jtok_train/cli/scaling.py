"""jtok-scaling: fit the JTok scaling law N_eff = N_c (1 + eta gamma(rho)) from finished runs.

    jtok-scaling runs/isoflop runs/eta_sweep               # run directories (result.json found recursively)
    jtok-scaling results.jsonl law=nd format=json          # .jsonl / .json files of run records
    jtok-scaling runs/ at=3e19 bootstrap=500               # iso-FLOP comparison at C = 3e19

Options (key=value):
    law=auto|nd|n|power   loss law fitted on the baseline runs (auto: the richest the runs support)
                          nd: L = E + A/N^alpha + B/D^beta; n: L = E + A/N^alpha; power: L = A/N^alpha
    at=<FLOPs>            compute at which the iso-FLOP frontiers are compared (default: geometric mean of
                          the baseline budgets)
    bootstrap=<n>         bootstrap resamples for gamma's interval (default 200; 0 = none)
    format=table|json
Records: see jtok_train/analysis/scaling.py (name, variant, active_params, eta, rho, tokens, val_loss, ...;
budget for the iso-FLOP view). Needs scipy: pip install 'jtok-train[analysis]'.
"""

from __future__ import annotations

import json
import math
import sys


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    try:
        # lazy: optional (scipy, the fits' optimisers: a missing one answers in one line)
        from jtok_train.analysis.scaling import ScalingError, analyze, format_report, load_records
    except ModuleNotFoundError as e:   # scipy: the `analysis` extra
        if (e.name or "").partition(".")[0] != "scipy":
            raise
        print("jtok-scaling: scipy is missing (the fits use it): pip install 'jtok-train[analysis]'", file=sys.stderr)
        return 2

    opts = {"law": "auto", "format": "table", "at": None, "bootstrap": "200"}
    paths = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key in opts:
            opts[key] = value
        elif eq and "/" not in key and not key.endswith((".json", ".jsonl")):
            print(f"jtok-scaling: unknown option {key}={value}: use law=, at=, bootstrap= or format=", file=sys.stderr)
            return 2
        else:
            paths.append(a)
    if opts["format"] not in ("table", "json"):
        print(f"jtok-scaling: format={opts['format']!r} is invalid: use format=table or format=json", file=sys.stderr)
        return 2
    try:
        at = float(opts["at"]) if opts["at"] is not None else None
        boot = int(opts["bootstrap"])
    except ValueError:
        print(f"jtok-scaling: at={opts['at']!r} / bootstrap={opts['bootstrap']!r} is not a number: e.g. at=3e19 "
              "bootstrap=200", file=sys.stderr)
        return 2
    if not paths:
        print("jtok-scaling: no runs given: pass run directories or .jsonl/.json files of run records", file=sys.stderr)
        return 2
    try:
        res = analyze(load_records(paths), law_form=opts["law"], at_compute=at, bootstrap=boot)
    except ScalingError as e:
        print(f"jtok-scaling: {e}", file=sys.stderr)
        return 2
    if opts["format"] == "json":
        print(json.dumps(_jsonable(res), indent=2))
    else:
        print(format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
