"""jtok-plan: parameter and FLOP accounting of a config, counted on the instantiated (meta) model, and with a
cluster a capacity plan: per-GPU memory, exchange bytes per step (with and without dedup) and the exchange's
share of the step time against the compute it hides behind.

    jtok-plan model=moe_17b_a2b jtok=jtokm            # a table
    jtok-plan model=dense_s jtok=jtok format=json     # JSON
    jtok-plan model=moe_17b_a2b jtok=jtokm parallel.embedding=sharded cluster=h100_8x8
    jtok-plan model=moe_17b_a2b jtok=jtokm parallel.embedding=sharded cluster=h100_8x8 cluster.gpus=128 \
        dedup_from=data/demo/text_document dedup_samples=64

Cluster: cluster=<preset> (jtok_train/configs/cluster/: cpu_2, h100_1x8, h100_8x8, h200_8x8) and/or cluster.<key>=value
(gpus, gpus_per_node, memory_gib, intra_node_GBps, inter_node_GBps, peak_tflops, mfu, hbm_GBps, latency_us).
Dedup ratio (unique/total ids per micro-batch): dedup_ratio=0.27, or dedup_from=<dataset prefix> (measured on
the first dedup_samples micro-batches the trainer would read, with the real row placement), else DESIGN.md's
measurement interpolated at the micro-batch's token count. attention=flash|local: activations with a fused
attention kernel or Megatron's local spec (default: the config's model.transformer_impl). Formulas:
jtok_train/planning/ (formulas.py, memory.py, exchange.py).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from jtok_train.config import ConfigError, compose, validate
from jtok_train.data.indexed import DataFileError
from jtok_train.errors import UsageError
from jtok_train.planning.cluster import PlanError, load_cluster
from jtok_train.planning.formulas import formula_params, plan
from jtok_train.planning.planner import capacity_plan


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.3f}{unit}"
    return f"{n:,.0f}"


def compute_plan(overrides: list[str]) -> dict:
    # imported when a model is counted, not for --help, a bad argument or a capacity plan without a model
    # lazy: cost (torch + megatron.core, 5-8 s)
    from jtok_train.compat import destroy_model_parallel, init_distributed, init_model_parallel
    from jtok_train.model.builder import build_model, build_transformer_config  # lazy: cost (as above)

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


def compute_capacity(overrides: list[str], cluster: Any,
                     dedup_ratio: float | None = None, dedup_from: str | None = None, dedup_samples: int = 64,
                     flash: bool | None = None) -> dict:
    """The capacity plan for a config on a cluster (no model is built)."""
    from jtok_train.planning.measure import measure_dedup  # lazy: cost (torch, 2-5 s: only with dedup_from=)

    cfg = compose(overrides)
    measured = measure_dedup(cfg, dedup_from, cluster.gpus, dedup_samples) if dedup_from else None
    return capacity_plan(cfg, cluster, dedup_ratio, measured, flash)


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB"


def _bytes(x: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(x) >= div:
            return f"{x / div:,.2f} {unit}"
    return f"{x:,.0f} B"


def capacity_rows(c: dict) -> list[tuple[str, str]]:
    cl, lay, mem = c["cluster"], c["layout"], c["memory"]
    rows = [
        ("cluster", f"{cl['name']}: {cl['gpus']} GPUs, {cl['gpus_per_node']}/node, {cl['memory_gib']:g} GiB, "
                    f"{cl['intra_node_GBps']:g}/{cl['inter_node_GBps']:g} GB/s intra/inter, "
                    f"{cl['peak_tflops']:g} TFLOP/s x MFU {cl['mfu']:g}"),
        ("layout", f"TP {lay['tp']} x DP {lay['dp']} (EP {lay['ep']}), {lay['num_micro']} micro-batches/step, tables "
                   + (f"sharded over {lay['emb_world']} ranks" if lay["sharded"] else "replicated")),
        ("dedup ratio (unique/total ids)", f"{c['dedup']['unique_ratio']:.3f} ({c['dedup']['source']})"),
        ("memory per GPU", ""),
        ("  backbone params", _gib(mem["params"])),
        ("  backbone grads (fp32 buffer)", _gib(mem["grads"])),
        ("  backbone optimizer states", _gib(mem["optimizer"])),
        ("  table shard", _gib(mem["table"])),
        ("  table grad", _gib(mem["table_grad"])),
        ("  table optimizer states", _gib(mem["table_optimizer"])),
        ("  activations (1 micro-batch)", _gib(mem["activations"])),
        ("  exchange buffers", _gib(mem["exchange_buffers"])),
        ("  total", f"{_gib(mem['total'])} of {cl['memory_gib']:g} GiB: "
                    + ("fits" if c["fits"] else "DOES NOT FIT") + f" ({_gib(c['headroom'])} headroom)"),
    ]
    e, t = c["exchange"], c["timing"]
    if e:
        for key, label in (("dedup", "with dedup"), ("no_dedup", "without dedup")):
            x, tx = e[key], t[key]
            rows.append((f"exchange per step {label}",
                         f"{_bytes(x['bytes_sent'])} sent per GPU (ids {_bytes(x['id_bytes'])}, rows "
                         f"{_bytes(x['row_bytes_forward'])}, grads {_bytes(x['grad_bytes_backward'])})"))
            rows.append((f"  time vs compute {label}",
                         f"{1e3 * tx['exchange_s_per_microbatch']:.2f} ms per micro-batch vs {1e3 * t['compute_s_per_microbatch']:.2f} ms "
                         f"compute = {100 * tx['share_of_compute']:.1f}% -> "
                         + ("hides behind compute" if tx["hides_behind_compute"] else "does NOT hide")
                         + f"; exposed {100 * tx['exposed_share_overlap']:.1f}% of the step with overlap, "
                           f"{100 * tx['exposed_share_no_overlap']:.1f}% without"))
        if e.get("premix"):
            pm, tp = e["premix"], t["premix"]
            rows.append(("owner premix (not implemented)",
                         f"{_bytes(pm['bytes_sent'])} per step = {pm['vs_dedup']:.2f}x dedup's bytes, "
                         f"{pm['all_to_alls_per_microbatch']} all-to-alls per micro-batch inside the compute: "
                         f"{100 * tp['exposed_share']:.1f}% of the step exposed"))
        rows.append(("remote share of unique ids", f"{e['remote_fraction']:.3f}"))
        o = c["table_optimizer"]
        rows.append(("table optimizer traffic per step", f"adamw {_bytes(o['adamw_bytes'])} ({1e3 * o['adamw_s']:.2f} ms), "
                     f"sparse_adamw <= {_bytes(o['sparse_adamw_bytes'])} ({1e3 * o['sparse_adamw_s']:.2f} ms)"))
    h = c.get("hot_rows")
    if h:
        rows.append((f"hot rows (parallel.hot_rows; {h['source']})",
                     f"configured {h['configured']}, shortest step at {h['best']}"))
        for o in h["options"]:
            rows.append((f"  H = {o['hot_rows']}",
                         f"{100 * o['hot_share_of_unique_ids']:.0f}% of unique ids local, "
                         f"{o['remote_rows_per_microbatch']:.0f} remote rows per micro-batch, exchange "
                         f"{_bytes(o['exchange_bytes_per_step'])} + all-reduce {_bytes(o['all_reduce_bytes_per_step'])} "
                         f"per step, replicas {_gib(o['replica_bytes_per_gpu'])}, step {1e3 * o['step_s_overlap']:.1f} ms"))
    return rows


@dataclass
class _PlanArgs:
    """jtok-plan's command line: the run config's overrides, the output format, the cluster and its options."""

    overrides: list[str] = field(default_factory=list)
    fmt: str = "table"
    cluster_name: str | None = None
    cluster_overrides: list[str] = field(default_factory=list)
    dedup_ratio: float | None = None
    dedup_from: str | None = None
    dedup_samples: int = 64
    flash: bool | None = None


def _parse(argv: list[str]) -> _PlanArgs:
    """The command line, or a UsageError naming the bad value and the fix."""
    a = _PlanArgs()
    opts: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("format="):
            a.fmt = arg.split("=", 1)[1]
        elif arg.startswith("cluster="):
            a.cluster_name = arg.split("=", 1)[1]
        elif arg.startswith("cluster."):
            a.cluster_overrides.append(arg[len("cluster."):])
        elif arg.split("=", 1)[0] in ("dedup_ratio", "dedup_from", "dedup_samples", "attention"):
            key, _, value = arg.partition("=")
            opts[key] = value
        else:
            a.overrides.append(arg)
    if a.fmt not in ("table", "json"):
        raise UsageError(f"format={a.fmt!r} is invalid: use format=table or format=json")
    try:
        a.dedup_ratio = float(opts["dedup_ratio"]) if "dedup_ratio" in opts else None
        a.dedup_samples = int(opts.get("dedup_samples", "64"))
    except ValueError:
        raise UsageError(f"dedup_ratio={opts.get('dedup_ratio')!r} / dedup_samples={opts.get('dedup_samples')!r} "
                         "is not a number: e.g. dedup_ratio=0.27 dedup_samples=64") from None
    if opts.get("attention", "flash") not in ("flash", "local"):
        raise UsageError(f"attention={opts['attention']!r} is invalid: use attention=flash (fused kernel, no s^2 "
                         "probabilities kept) or attention=local (Megatron's local spec)")
    a.flash = {"flash": True, "local": False}.get(opts.get("attention", ""), None)
    a.dedup_from = opts.get("dedup_from")
    if a.dedup_ratio is not None and a.dedup_from is not None:
        raise UsageError("give dedup_ratio= or dedup_from=, not both")
    return a


def _table_rows(out: dict) -> list[tuple[str, str]]:
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
    return rows + (capacity_rows(out["capacity"]) if "capacity" in out else [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        a = _parse(argv)
    except UsageError as e:
        print(f"jtok-plan: {e}", file=sys.stderr)
        return e.exit_code
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        cluster = None
        if a.cluster_name is not None or a.cluster_overrides:
            cluster = load_cluster(a.cluster_name, a.cluster_overrides)   # cheap: bad cluster input fails first
        out = compute_plan(a.overrides)
        if cluster is not None:
            out["capacity"] = compute_capacity(a.overrides, cluster, a.dedup_ratio, a.dedup_from, a.dedup_samples,
                                               a.flash)
    except (ConfigError, HydraException, OmegaConfBaseException, PlanError) as e:
        msg = str(e).strip().replace("\n", " ")
        print(f"jtok-plan: bad config: {msg}", file=sys.stderr)
        return 2
    except (OSError, ValueError, DataFileError) as e:   # dedup_from: missing or unreadable data
        msg = str(e).strip().replace("\n", " ")
        print(f"jtok-plan: {msg}", file=sys.stderr)
        return 3
    if a.fmt == "json":
        keys = ["backbone_params", "active_params", "token_params", "total_params", "eta", "rho", "flops_per_token"]
        print(json.dumps({k: out[k] for k in keys} | {k: v for k, v in out.items() if k not in keys}, indent=2))
        return 0
    rows = _table_rows(out)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
