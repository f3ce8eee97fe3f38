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
    from jtok_train.planning.formulas import count_model, formula_params, plan
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


@pytest.mark.e2e
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


# ----------------------------------------------------------------------------------------------------------------
# Capacity planner (jtok_train/planning/): arithmetic checked against hand-computed answers
# ----------------------------------------------------------------------------------------------------------------

BIG = ["model=moe_17b_a2b", "jtok=jtokm", "train=default", "train.eval_samples=256", "parallel.embedding=sharded"]


def _compose(*overrides):
    from jtok_train.config import compose

    return compose(list(overrides))


def test_params_per_rank_sum_to_the_closed_form_and_split_by_tp_and_ep():
    from jtok_train.planning.formulas import formula_params
    from jtok_train.planning.layout import layout
    from jtok_train.planning.memory import params_per_rank

    for model, jtok in CASES:
        cfg = _compose(f"model={model}", f"jtok={jtok}", "train.global_batch_size=16", "train.micro_batch_size=1",
                       "train.eval_samples=16")
        p = params_per_rank(cfg, layout(cfg, 1))
        f = formula_params(cfg)
        counted = sum(v for k, v in p.items() if k not in ("table", "table_rows_local"))
        assert counted == f.backbone_params + f.jtok_dense_params, (model, jtok)
        assert p["table"] == f.token_params
    cfg = _compose(*BIG, "parallel.expert_model_parallel_size=8", "parallel.tensor_model_parallel_size=2",
                   "parallel.sequence_parallel=true")
    one = params_per_rank(_compose(*BIG), layout(_compose(*BIG), 64))
    split = params_per_rank(cfg, layout(cfg, 64))
    assert split["routed_experts"] == one["routed_experts"] / 8          # EP 8, expert-TP 1
    for key in ("attention", "embedding", "output_layer", "shared_expert"):
        assert split[key] == one[key] / 2                               # TP 2
    assert split["norms"] == one["norms"] and split["moe_router"] == one["moe_router"]
    assert one["table_rows_local"] == -(-152064 // 64) and one["table"] == 2376 * 28 * 5 * 2048


def test_memory_bytes_per_parameter_by_precision_and_optimizer():
    from jtok_train.planning.layout import layout
    from jtok_train.planning.memory import memory_per_rank, params_per_rank

    base = ["model=tiny", "jtok=jtokm", "train.global_batch_size=16", "train.eval_samples=16"]
    for prec, (pb, gb, ob) in (("fp32", (4, 4, 8)), ("bf16", (2, 4, 12))):
        for emb in ("replicated", "sharded"):
            cfg = _compose(*base, f"train.precision={prec}", f"parallel.embedding={emb}")
            lay = layout(cfg, 2)
            p = params_per_rank(cfg, lay)
            n = sum(v for k, v in p.items() if k not in ("table", "table_rows_local")) + (p["table"] if emb == "replicated" else 0)
            mem = memory_per_rank(cfg, lay, 0.5)
            assert (mem["params"], mem["grads"], mem["optimizer"]) == (pb * n, gb * n, ob * n)
            if emb == "sharded":    # fp32 shard, grad + touched flag, two moments + int64 step per row
                rows = 4096 // 2
                row = 4 * 4 * 5 * 128
                assert mem["table"] == rows * row and mem["table_grad"] == rows * row + rows
                assert mem["table_optimizer"] == 2 * rows * row + 8 * rows
            else:
                assert mem["table"] == mem["table_grad"] == mem["table_optimizer"] == mem["exchange_buffers"] == 0
            assert mem["total"] == pytest.approx(sum(mem[k] for k in ("params", "grads", "optimizer", "table",
                                                                      "table_grad", "table_optimizer", "activations",
                                                                      "exchange_buffers")))
    # exchange buffers: this micro-batch's rows (3 U), the prefetched next (2 U), the row gradients of at most
    # two micro-batches (2 U each; the table accumulates them early): no growth with micro-batches per step
    row = 4 * 4 * 5 * 128
    for gbs, n_micro in ((8, 1), (16, 2), (64, 8)):
        cfg = _compose("model=tiny", "jtok=jtokm", "parallel.embedding=sharded", f"train.global_batch_size={gbs}",
                       "train.eval_samples=16")
        lay = layout(cfg, 2)
        assert lay.num_micro == n_micro
        U = 0.5 * 4 * 256
        assert memory_per_rank(cfg, lay, 0.5)["exchange_buffers"] == (5 + 2 * min(n_micro, 2)) * U * row
    # the distributed optimizer shards the states over data-parallel ranks (experts over expert-DP ranks)
    cfg = _compose(*BIG, "parallel.use_distributed_optimizer=true", "parallel.expert_model_parallel_size=8")
    lay = layout(cfg, 64)
    p = params_per_rank(cfg, lay)
    dense = sum(v for k, v in p.items() if k not in ("table", "table_rows_local", "routed_experts"))
    assert memory_per_rank(cfg, lay, 0.2)["optimizer"] == pytest.approx(12 * (dense / 64 + p["routed_experts"] / 8))
    # sparse_adamw allocates the same moments (lazy updates, not lazy allocation)
    sparse = _compose(*BIG, "jtok.table_optimizer=sparse_adamw")
    assert memory_per_rank(sparse, layout(sparse, 64), 0.2)["table_optimizer"] == \
        memory_per_rank(_compose(*BIG), layout(_compose(*BIG), 64), 0.2)["table_optimizer"]


def test_exchange_bytes_and_timing_against_hand_computation():
    from jtok_train.planning.cluster import Cluster
    from jtok_train.planning.exchange import exchange_per_step, step_timing
    from jtok_train.planning.layout import layout

    # tiny: L 4, n_e 5, d 128 -> row 10,240 B; micro-batch 4 x 256 = 1,024 positions; 16 ranks, 1 micro-batch/step
    cfg = _compose("model=tiny", "jtok=jtokm", "parallel.embedding=sharded", "train.global_batch_size=64",
                   "train.eval_samples=64")
    lay = layout(cfg, 16)
    assert (lay.dp, lay.num_micro, lay.emb_world) == (16, 1, 16)
    e = exchange_per_step(cfg, lay, 0.25)
    rb = 4 * 4 * 5 * 128
    U, r = 0.25 * 1024, 15 / 16
    assert e["row_bytes"] == rb and e["remote_fraction"] == r
    assert e["dedup"]["bytes_sent"] == pytest.approx(U * r * (8 + 2 * rb))
    assert e["no_dedup"]["bytes_sent"] == pytest.approx(1024 * r * (8 + 2 * rb))
    assert e["dedup"]["grad_bytes_backward"] == pytest.approx(U * r * rb)
    # owner premix (estimate): per remote position id + per layer K (weight, set id) out and a d-vector back;
    # backward a d-vector gradient out, K weight gradients back
    pos = 1024 * r
    pm = e["premix"]
    assert pm["bytes_per_microbatch"] == pytest.approx(pos * (8 + 4 * 5 * 2 + 4 * 4 * 128) + pos * 4 * (4 * 128 + 4 * 2))
    assert pm["vs_dedup"] == pytest.approx(pm["bytes_per_microbatch"] / e["dedup"]["bytes_per_microbatch"])
    assert 1 / (5 * 0.25) * 0.9 < pm["vs_dedup"] < 1 / (5 * 0.25) * 1.1     # ~ 1 / (n_e U/T), BENCHMARKS.md
    assert exchange_per_step(_compose("model=tiny", "jtok=jtok", "parallel.embedding=sharded",
                                      "train.global_batch_size=64", "train.eval_samples=64"), lay, 0.25)["premix"] is None
    # 2 nodes x 8 GPUs: 7 of 15 peers over NVLink, 8 over the network, in parallel; compute 1 s per micro-batch
    cl = Cluster(gpus=16, gpus_per_node=8, intra_node_GBps=100, inter_node_GBps=10, peak_tflops=1.0, mfu=0.5,
                 latency_us=0)
    fpt = 0.5e12 / 1024
    t = step_timing(cfg, lay, cl, fpt, e)
    assert t["compute_s_per_microbatch"] == pytest.approx(1.0)
    fwd = e["dedup"]["forward_bytes_per_microbatch"]
    assert t["dedup"]["forward_s"] == pytest.approx(max(fwd * 7 / 15 / 100e9, fwd * 8 / 15 / 10e9))
    x = t["dedup"]["exchange_s_per_microbatch"]
    assert t["dedup"]["share_of_compute"] == pytest.approx(x) and t["dedup"]["hides_behind_compute"]
    # exchange slower than compute: it cannot hide
    slow = Cluster(gpus=16, gpus_per_node=8, intra_node_GBps=1e-3, inter_node_GBps=1e-3, peak_tflops=1.0, mfu=0.5)
    assert not step_timing(cfg, lay, slow, fpt, e)["dedup"]["hides_behind_compute"]
    # premix runs 4 all-to-alls per layer inside the compute: all of it is exposed
    assert t["premix"]["step_s"] == pytest.approx(1.0 + t["premix"]["exchange_s_per_microbatch"])


def test_cluster_presets_overrides_and_errors():
    from jtok_train.planning.cluster import PlanError, cluster_names, load_cluster
    from jtok_train.planning.exchange import default_dedup_ratio

    assert {"h100_8x8", "h200_8x8", "h100_1x8", "cpu_2"} <= set(cluster_names())
    c = load_cluster("h100_8x8", ["gpus=128", "mfu=0.35"])
    assert (c.gpus, c.gpus_per_node, c.memory_gib, c.inter_node_GBps, c.peak_tflops, c.mfu) == (128, 8, 80, 50, 989, 0.35)
    with pytest.raises(PlanError, match="not a preset"):
        load_cluster("h100_9x9")
    with pytest.raises(PlanError, match="did you mean cluster.gpus_per_node"):
        load_cluster("h100_8x8", ["gpus_per_nod=4"])
    with pytest.raises(PlanError, match="cluster.mfu=1.5 is invalid"):
        load_cluster(None, ["mfu=1.5"])
    with pytest.raises(PlanError, match="cluster.gpus=-8 is invalid"):
        load_cluster(None, ["gpus=-8"])
    # DESIGN.md's measured unique/total ratios, interpolated on a log scale between them
    assert default_dedup_ratio(2048) == pytest.approx(0.27) and default_dedup_ratio(16384) == pytest.approx(0.14)
    assert 0.22 < default_dedup_ratio(3000) < 0.27


def test_measured_dedup_counts_unique_ids_of_the_training_microbatches(small_dataset):
    import numpy as np

    from jtok_train.data.datasets import build_datasets
    from jtok_train.data.tokenizer import load_tokenizer
    from jtok_train.planning.measure import measure_dedup
    from tests.conftest import tiny_overrides

    cfg = _compose(*tiny_overrides(small_dataset, "unused"))
    one = measure_dedup(cfg, small_dataset["prefix"], 1, micro_batches=6)
    two = measure_dedup(cfg, small_dataset["prefix"], 2, micro_batches=6)
    ds, _ = build_datasets([small_dataset["prefix"]], load_tokenizer(small_dataset["tokenizer"]), seq_length=64,
                           seed=cfg.train.seed, train_samples=12, valid_samples=0, split=cfg.data.split)
    uniq = [len(np.unique(np.concatenate([ds[2 * j]["tokens"].numpy(), ds[2 * j + 1]["tokens"].numpy()])))
            for j in range(6)]
    assert one["unique_ratio"] == pytest.approx(sum(uniq) / (6 * 128)) == two["unique_ratio"]
    assert one["remote_fraction"] == 0.0                   # one rank owns every row
    assert 0.3 < two["remote_fraction"] < 0.7              # half of the rows live on the other rank


@pytest.mark.e2e
def test_jtok_plan_cli_capacity_on_the_paper_config():
    """moe_17b_a2b + JTok-M on 64 H100s: EP 8, distributed optimizer, flash attention, micro-batch 1 x 4096 tokens
    and 4 micro-batches per step fit in 80 GiB (row-gradient buffers of at most two micro-batches are held,
    whatever the number of micro-batches per step)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    args = [*BIG, "parallel.expert_model_parallel_size=8", "parallel.use_distributed_optimizer=true",
            "train.micro_batch_size=1", "train.global_batch_size=256", "cluster=h100_8x8", "attention=flash", "dedup_ratio=0.22", "format=json"]
    proc = subprocess.run([sys.executable, "-m", "jtok_train.cli.plan", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)["capacity"]
    assert c["layout"]["dp"] == 64 and c["layout"]["num_micro"] == 4 and c["layout"]["sharded"]
    mem = c["memory"]
    # every GPU holds 1/64 of the 43.6B-entry tables in fp32
    assert mem["table"] * 64 == pytest.approx(43.6e9 * 4, rel=0.01)
    assert c["fits"] and 40 * 2**30 < mem["total"] < 80 * 2**30
    x = c["exchange"]
    assert x["remote_fraction"] == pytest.approx(63 / 64)
    assert x["no_dedup"]["bytes_sent"] == pytest.approx(x["dedup"]["bytes_sent"] / 0.22)
    assert c["timing"]["dedup"]["hides_behind_compute"]
    assert c["timing"]["dedup"]["share_of_compute"] < c["timing"]["no_dedup"]["share_of_compute"]
    bad = subprocess.run([sys.executable, "-m", "jtok_train.cli.plan", *BIG, "cluster=h100_8x8", "cluster.gpu=8"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "unknown cluster key cluster.gpu" in bad.stderr


def test_hot_rows_options_against_hand_computation():
    """parallel.hot_rows in the planner: the tail's exchange shrinks by the hot share, the replicas cost 4 fp32
    copies of H rows (weights, gradient, 2 moments) and a ring all-reduce of H rows per step."""
    import numpy as np

    from jtok_train.planning.cluster import Cluster
    from jtok_train.planning.exchange import exchange_per_step, hot_rows_options, step_timing, zipf_hot_share
    from jtok_train.planning.layout import layout

    cfg = _compose("model=tiny", "jtok=jtokm", "parallel.embedding=sharded", "train.global_batch_size=64",
                   "train.eval_samples=64")
    lay = layout(cfg, 16)
    e = exchange_per_step(cfg, lay, 0.25)
    cl = Cluster(gpus=16, gpus_per_node=8, intra_node_GBps=100, inter_node_GBps=10, peak_tflops=1.0, mfu=0.5,
                 latency_us=0)
    t = step_timing(cfg, lay, cl, 0.5e12 / 1024, e)
    h = hot_rows_options(cfg, lay, cl, e, t, {0: 0.0, 1024: 0.5, 4096: 1.0})
    by = {o["hot_rows"]: o for o in h["options"]}
    rb = e["row_bytes"]
    assert by[0]["exchange_bytes_per_step"] == pytest.approx(e["dedup"]["bytes_sent"])
    assert by[0]["step_s_overlap"] == pytest.approx(t["dedup"]["step_s_overlap"])    # H = 0 is today's plan
    assert by[1024]["exchange_bytes_per_step"] == pytest.approx(0.5 * e["dedup"]["bytes_sent"])
    assert by[1024]["remote_rows_per_microbatch"] == pytest.approx(0.5 * e["dedup"]["remote_rows_per_microbatch"])
    assert by[1024]["replica_bytes_per_gpu"] == 4 * 1024 * rb
    assert by[1024]["all_reduce_bytes_per_step"] == pytest.approx(2 * 15 / 16 * 1024 * rb)
    assert by[1024]["all_reduce_s"] == pytest.approx(2 * 15 / 16 * 1024 * rb / 10e9)   # 16 GPUs: over the network
    assert by[4096]["exchange_bytes_per_step"] == 0
    assert h["best"] == min(by, key=lambda k: by[k]["step_s_overlap"])
    # the Zipf model: shares grow with H, reach 1 at the whole vocabulary; an 8K vocabulary and 2,048 tokens give
    # about what DESIGN.md measured on the demo corpus (53-57% of unique ids among the top 1,024, 76-88% 4,096)
    shares = [zipf_hot_share(8192, 2048, k) for k in (0, 256, 1024, 4096, 8192)]
    assert shares[0] == 0 and np.all(np.diff(shares) > 0) and shares[-1] == pytest.approx(1.0)
    assert 0.5 < shares[2] < 0.62 and 0.76 < shares[3] < 0.9


def test_plan_evaluates_hot_rows_for_the_17b_model_on_64_gpus():
    from jtok_train.planning.cluster import load_cluster
    from jtok_train.planning.planner import capacity_plan

    cfg = _compose(*BIG, "parallel.expert_model_parallel_size=8", "parallel.use_distributed_optimizer=true",
                   "train.micro_batch_size=1", "train.global_batch_size=256", "parallel.hot_rows=2048")
    c = capacity_plan(cfg, load_cluster("h100_8x8"), dedup_ratio=0.22)
    h = c["hot_rows"]
    assert h["configured"] == 2048 and "Zipf" in h["source"]
    hs = [o["hot_rows"] for o in h["options"]]
    assert 0 in hs and 2048 in hs and h["best"] in hs
    remote = [o["remote_rows_per_microbatch"] for o in h["options"]]
    assert all(a > b for a, b in zip(remote, remote[1:]))          # more hot rows, fewer remote rows
    assert h["options"][0]["exchange_bytes_per_step"] == pytest.approx(c["exchange"]["dedup"]["bytes_sent"])
