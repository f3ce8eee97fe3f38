"""Exchange bytes per step of the sharded tables, the step time against the compute they hide behind, and the
table optimizer's memory traffic.

the real row placement: ``measure_dedup``). Without dedup U = T_local.

Owner premix (the paper's variant, not implemented: BENCHMARKS.md) is estimated next to it for JTok-M: per
remote position the token id and per layer K weights + set ids go out and one blended d-vector comes back
(backward: its gradient out, K weight gradients back); 4 all-to-alls per layer, inside the forward/backward.

Time: compute per micro-batch = FLOPs per token x tokens / TP / (peak x MFU); exchange per micro-batch = bytes
over NVLink to same-node peers and over the inter-node network to the others, in parallel, plus a latency per
all-to-all. With overlap, micro-batch i+1's forward exchange and micro-batch i's gradient exchange run behind
compute: the exchange hides when it needs less time than one micro-batch's compute; the first forward and the
last gradient exchange stay exposed.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from jtok_train.config import RunConfig
from jtok_train.planning.cluster import Cluster
from jtok_train.planning.layout import Layout
from jtok_train.planning.memory import local_positions, row_bytes

__all__ = ["default_dedup_ratio", "exchange_per_step", "step_timing", "table_optimizer_traffic", "zipf_hot_share",
           "hot_rows_options", "HOT_ROW_CANDIDATES"]


_DESIGN_DEDUP = ((2048, 0.27), (4096, 0.22), (8192, 0.18), (16384, 0.14), (65536, 0.08))


def default_dedup_ratio(tokens: float) -> float:
    """unique/total ids per micro-batch measured in DESIGN.md (Python docs, 8K-50K BPE), log-interpolated."""
    pts = _DESIGN_DEDUP
    if tokens <= pts[0][0]:
        return min(1.0, pts[0][1] * (pts[0][0] / max(tokens, 1)) ** 0.3)
    for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
        if tokens <= t1:
            w = math.log(tokens / t0) / math.log(t1 / t0)
            return r0 + w * (r1 - r0)
    return pts[-1][1]


def exchange_per_step(cfg: RunConfig, lay: Layout, unique_ratio: float, remote_fraction: Optional[float] = None) -> dict:
    """Per GPU per optimizer step, with dedup (at ``unique_ratio``) and without."""
    T_local = local_positions(cfg, lay)
    W = lay.emb_world
    r = (W - 1) / W if remote_fraction is None else remote_fraction
    rb = row_bytes(cfg)

    def one(u: float) -> dict:
        remote = u * r
        ids, rows_fwd, grads = 8 * remote, remote * rb, remote * rb
        per_mb = ids + rows_fwd + grads
        return {"unique_per_microbatch": u, "remote_rows_per_microbatch": remote, "id_bytes": ids * lay.num_micro,
                "row_bytes_forward": rows_fwd * lay.num_micro, "grad_bytes_backward": grads * lay.num_micro,
                "bytes_sent": per_mb * lay.num_micro, "bytes_per_microbatch": per_mb,
                "forward_bytes_per_microbatch": ids + rows_fwd, "backward_bytes_per_microbatch": grads,
                "count_bytes": 8 * W * lay.num_micro}

    out = {"row_bytes": rb, "positions_per_microbatch": T_local, "remote_fraction": r, "unique_ratio": unique_ratio,
           "dedup": one(unique_ratio * T_local), "no_dedup": one(T_local), "premix": None}
    j = cfg.jtok
    if j.variant == "jtokm":
        # Owner premix (the paper's variant, not implemented here): per remote position the requester sends the
        # token id and, per layer, the K router weights and set ids (4 + 1 B each); the owner returns one blended
        # d-vector per layer. Backward: the d-vector's gradient goes to the owner, the K weight gradients come back.
        L, d, K = cfg.model.num_layers, cfg.model.hidden_size, j.top_k
        pos = T_local * r
        fwd = pos * (8 + L * 5 * K) + pos * L * 4 * d
        bwd = pos * L * (4 * d + 4 * K)
        out["premix"] = {"remote_positions_per_microbatch": pos, "forward_bytes_per_microbatch": fwd,
                         "backward_bytes_per_microbatch": bwd, "bytes_per_microbatch": fwd + bwd,
                         "bytes_sent": (fwd + bwd) * lay.num_micro, "all_to_alls_per_microbatch": 4 * L,
                         "vs_dedup": (fwd + bwd) / max(out["dedup"]["bytes_per_microbatch"], 1e-30)}
    return out


def _a2a_seconds(nbytes: float, cl: Cluster, W: int) -> float:
    if nbytes <= 0 or W <= 1:
        return 0.0
    g = min(cl.gpus_per_node, W)
    intra_share = (g - 1) / (W - 1)
    t_intra = nbytes * intra_share / (cl.intra_node_GBps * 1e9)
    t_inter = nbytes * (1 - intra_share) / (cl.inter_node_GBps * 1e9)
    return max(t_intra, t_inter) + cl.latency_us * 1e-6


def step_timing(cfg: RunConfig, lay: Layout, cl: Cluster, flops_per_token: float, exch: dict) -> dict:
    tokens_mb = cfg.model.seq_length * cfg.train.micro_batch_size
    # one stage's share of a micro-batch's compute (its layers; the embedding and head are counted evenly)
    t_c = flops_per_token * tokens_mb / lay.tp / lay.pp / (cl.peak_tflops * 1e12 * cl.mfu)
    # 1F1B: the pipeline fills and drains, each stage idles (pp - 1) micro-batch slots per step; interleaved
    # stages fill and drain with chunk slots, 1/vpp of a micro-batch each (Narayanan et al. 2021, sec. 2.2)
    fill = (lay.pp - 1) * t_c / lay.vpp      # the pipeline bubble (0 without PP)
    bubble = fill / (lay.num_micro * t_c + fill) if fill else 0.0
    out = {"compute_s_per_microbatch": t_c, "num_microbatches": lay.num_micro, "pipeline_bubble_share": bubble,
           "pipeline_bubble_s": fill, "virtual_stages": lay.vpp}
    for key in ("dedup", "no_dedup"):
        e = exch[key]
        t_f = _a2a_seconds(e["forward_bytes_per_microbatch"], cl, lay.emb_world)
        t_b = _a2a_seconds(e["backward_bytes_per_microbatch"], cl, lay.emb_world)
        t_x = t_f + t_b
        n = lay.num_micro
        overlapped = n * t_c + t_f + t_b + (n - 1) * max(0.0, t_x - t_c) + fill
        serial = n * (t_c + t_f) + t_b + fill
        out[key] = {"exchange_s_per_microbatch": t_x, "forward_s": t_f, "backward_s": t_b,
                    "share_of_compute": t_x / t_c if t_c else math.inf, "hides_behind_compute": t_x <= t_c,
                    "step_s_overlap": overlapped, "step_s_no_overlap": serial,
                    "exposed_share_overlap": (overlapped - n * t_c) / overlapped,
                    "exposed_share_no_overlap": (serial - n * t_c) / serial}
    pm = exch.get("premix")
    if pm:
        # the weights depend on each layer's input: 2 all-to-alls per layer in the forward and 2 in the backward,
        # inside the computation (nothing prefetched); counted as fully exposed
        L = lay.stage_layers
        t_f = L * (_a2a_seconds(pm["forward_bytes_per_microbatch"] / L, cl, lay.emb_world) + cl.latency_us * 1e-6)
        t_b = L * (_a2a_seconds(pm["backward_bytes_per_microbatch"] / L, cl, lay.emb_world) + cl.latency_us * 1e-6)
        step = lay.num_micro * (t_c + t_f + t_b)
        out["premix"] = {"exchange_s_per_microbatch": t_f + t_b, "share_of_compute": (t_f + t_b) / t_c,
                         "step_s": step, "exposed_share": (step - lay.num_micro * t_c) / step}
    out["backbone_step_s"] = lay.num_micro * t_c + fill
    return out


def table_optimizer_traffic(cfg: RunConfig, lay: Layout, cl: Cluster, ratio: float) -> dict:
    """Bytes the table optimizer reads and writes per step: dense AdamW touches the whole shard (p, g, m, v read;
    p, m, v written), sparse AdamW the rows that got a gradient (plus gathering and scattering them)."""
    rows = math.ceil(cfg.model.vocab_size / lay.emb_world)
    rb = row_bytes(cfg)
    T_local = local_positions(cfg, lay)
    # ids a step touches on one owner: at most every requester's unique ids spread over W owners
    touched = min(rows, ratio * T_local * lay.num_micro * lay.world / lay.emb_world)
    dense = 7 * rows * rb
    sparse = 15 * touched * rb
    bw = cl.hbm_GBps * 1e9
    return {"kind": cfg.jtok.table_optimizer, "rows_per_rank": rows, "touched_rows_upper_bound": touched,
            "adamw_bytes": dense, "sparse_adamw_bytes": sparse, "adamw_s": dense / bw, "sparse_adamw_s": sparse / bw}


HOT_ROW_CANDIDATES = (0, 256, 1024, 4096, 16384, 65536)
# Zipf exponent of the token-frequency model below: with it, a 2,048-token micro-batch of an 8K vocabulary has
# 53-58% of its unique ids among the 1,024 most frequent and 87% among the 4,096 most frequent, close to what
# DESIGN.md measured on the demo corpus (53-57%, 76-88%)
ZIPF_EXPONENT = 1.1


def zipf_hot_share(vocab: int, tokens: float, hot_rows: int, exponent: float = ZIPF_EXPONENT) -> float:
    """Expected share of a micro-batch's unique ids among the ``hot_rows`` most frequent, for ``tokens`` draws
    from a Zipf(``exponent``) distribution over ``vocab`` ids (used where no data's counts are measured)."""
    if hot_rows <= 0:
        return 0.0
    k = np.arange(1, vocab + 1, dtype=np.float64)
    p = k ** -exponent
    p /= p.sum()
    seen = -np.expm1(tokens * np.log1p(-p))          # P(id k occurs at least once) = 1 - (1 - p_k)^T
    return float(seen[: min(hot_rows, vocab)].sum() / seen.sum())


def _ring_all_reduce_seconds(nbytes: float, cl: Cluster, W: int) -> float:
    """A ring all-reduce over W GPUs: each sends and receives 2 (W - 1) / W of the buffer over its slowest link."""
    if nbytes <= 0 or W <= 1:
        return 0.0
    link = cl.intra_node_GBps if W <= cl.gpus_per_node else cl.inter_node_GBps
    return 2 * (W - 1) / W * nbytes / (link * 1e9) + 2 * (W - 1) * cl.latency_us * 1e-6


def hot_rows_options(cfg: RunConfig, lay: Layout, cl: Cluster, exch: dict, timing: dict, hot_share: dict) -> dict:
    """parallel.hot_rows = H for each H of ``hot_share`` ({H: share of a micro-batch's unique ids among the H
    most frequent}): per GPU the replicas' memory (the rows, their gradient and 2 Adam moments, fp32), the
    exchange bytes and time of the tail, the all-reduce of the replicas' gradient (once per step; counted as
    exposed, a bound: it overlaps with the tail's last gradient exchange), and the step time; ``best``: the H of
    the shortest step."""
    rb, W, n = exch["row_bytes"], lay.emb_world, lay.num_micro
    d = exch["dedup"]
    t_c = timing["compute_s_per_microbatch"]
    fill = timing["pipeline_bubble_s"]
    out = []
    for H, share in sorted(hot_share.items()):
        keep = 1.0 - share
        f_bytes, b_bytes = d["forward_bytes_per_microbatch"] * keep, d["backward_bytes_per_microbatch"] * keep
        t_f, t_b = _a2a_seconds(f_bytes, cl, W), _a2a_seconds(b_bytes, cl, W)
        t_x = t_f + t_b
        ar_bytes = H * rb
        t_ar = _ring_all_reduce_seconds(ar_bytes, cl, W)
        step = n * t_c + t_f + t_b + (n - 1) * max(0.0, t_x - t_c) + fill + t_ar
        out.append({"hot_rows": H, "hot_share_of_unique_ids": share,
                    "remote_rows_per_microbatch": d["remote_rows_per_microbatch"] * keep,
                    "replica_bytes_per_gpu": 4 * H * rb, "exchange_bytes_per_step": (f_bytes + b_bytes) * n,
                    "all_reduce_bytes_per_step": 2 * (W - 1) / W * ar_bytes if W > 1 else 0.0,
                    "exchange_s_per_microbatch": t_x, "all_reduce_s": t_ar, "step_s_overlap": step})
    best = min(out, key=lambda o: o["step_s_overlap"]) if out else None
    return {"options": out, "best": best["hot_rows"] if best else None}
