"""Capacity planner: per-GPU memory, per-step exchange bytes and exchange time vs compute for a config on a cluster.

Everything here is arithmetic on the config (no model is built), written against what this framework
allocates and sends, so the figures can be checked against live runs (tests/distributed/test_planner_measured.py
does, on 2 gloo ranks). ``capacity_plan`` puts together:

- ``formulas``: parameters and FLOPs per token (the closed forms every figure here derives from);
- ``cluster``: the cluster and ``PlanError``; ``layout``: TP x PP x DP and the pipeline schedule;
- ``memory``: per-GPU memory; ``exchange``: exchange bytes, step time, table optimizer traffic;
- ``measure``: the dedup ratio measured on real micro-batches (the one part that reads data).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

from jtok_train.config import RunConfig
from jtok_train.planning.cluster import Cluster, PlanError
from jtok_train.planning.exchange import (
    HOT_ROW_CANDIDATES,
    default_dedup_ratio,
    exchange_per_step,
    hot_rows_options,
    step_timing,
    table_optimizer_traffic,
    zipf_hot_share,
)
from jtok_train.planning.formulas import flops_per_token, formula_params
from jtok_train.planning.layout import layout
from jtok_train.planning.memory import local_positions, memory_per_rank

__all__ = ["GiB", "capacity_plan"]

GiB = 2**30


def capacity_plan(cfg: RunConfig, cluster: Cluster, dedup_ratio: Optional[float] = None,
                  dedup_measured: Optional[dict] = None, flash: Optional[bool] = None) -> dict:
    """Memory per GPU, exchange bytes per step and exchange vs compute time for ``cfg`` on ``cluster``; the
    compute from the closed-form FLOPs per token (``formulas``). ``dedup_measured``: ``measure.measure_dedup``'s
    result, else ``dedup_ratio``, else DESIGN.md's measurement at this micro-batch size."""
    lay = layout(cfg, cluster.gpus)
    T_local = local_positions(cfg, lay)
    remote = None
    if dedup_measured is not None:
        ratio, source, remote = dedup_measured["unique_ratio"], f"measured on {dedup_measured['prefix']}", \
            dedup_measured["remote_fraction"]
    elif dedup_ratio is not None:
        if not 0 < dedup_ratio <= 1:
            raise PlanError(f"dedup_ratio={dedup_ratio} is invalid: unique/total ids per micro-batch, in (0, 1]")
        ratio, source = dedup_ratio, "given"
    else:
        ratio, source = default_dedup_ratio(T_local), f"default (DESIGN.md's measurement at {T_local:.0f} tokens)"
    if not cfg.parallel.dedup:
        ratio, source = 1.0, "parallel.dedup=false"
    mem = memory_per_rank(cfg, lay, ratio, flash)
    exch = exchange_per_step(cfg, lay, ratio, remote) if lay.sharded else None
    fpt = flops_per_token(cfg, formula_params(cfg))
    timing = step_timing(cfg, lay, cluster, fpt, exch) if exch else None
    capacity = cluster.memory_gib * GiB
    hot = None
    if exch and cfg.jtok.variant != "none":
        # parallel.hot_rows: each candidate H (and the configured one) evaluated; the share of unique ids each
        # serves locally from the data's counts when measured, else from a Zipf model of token frequencies
        shares = (dedup_measured or {}).get("hot_share")
        source = f"measured on {dedup_measured['prefix']}" if shares else "Zipf model (planning/exchange.py)"
        cands = sorted({h for h in (*HOT_ROW_CANDIDATES, cfg.parallel.hot_rows) if h <= cfg.model.vocab_size})
        if not shares:
            shares = {h: zipf_hot_share(cfg.model.vocab_size, T_local, h) for h in cands}
        hot = {**hot_rows_options(cfg, lay, cluster, exch, timing, {int(h): v for h, v in shares.items()}),
               "source": source, "configured": cfg.parallel.hot_rows}
    return {
        "cluster": asdict(cluster),
        "layout": asdict(lay),
        "dedup": {"unique_ratio": ratio, "source": source, **({"measured": dedup_measured} if dedup_measured else {})},
        "memory": mem,
        "memory_capacity": capacity,
        "fits": mem["total"] <= capacity,
        "headroom": capacity - mem["total"],
        "exchange": exch,
        "timing": timing,
        "table_optimizer": table_optimizer_traffic(cfg, lay, cluster, ratio) if lay.sharded else None,
        "hot_rows": hot,
    }

