"""The capacity planner against real runs: a tiny training on 2 gloo ranks with sharded tables, its exchange bytes
per step (ExchangeStats) and its per-rank memory measured on the live tensors, against jtok-plan's figures for
the same config, data and world size (MoE + JTok-M fp32, dense + JTok bf16, MoE + JTok-M with TP 2 + sequence
parallelism). Everything within 5% (seen: exchange bytes exact, parameters, gradients, tables and table
optimizer exact, Megatron optimizer states within 0.02%, activations within 1%).

The planner measures the dedup ratio on the same micro-batches the run trains on (``measure_dedup`` with the
trainer's dataset sizes), so the exchange figure is compared at the run's own token statistics."""

from __future__ import annotations

from typing import Any

import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed

TOL = 0.05


def _nbytes(tensors) -> int:
    """Bytes of distinct tensors (keyed by data pointer, so views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def _saved_bytes(model, batch: dict, weights: set[int]) -> tuple[int, Any]:
    """One training forward of ``model``: the bytes of the unique storages autograd saves for its backward
    (weights excluded), counted after the forward (Megatron frees some after use: selective recompute's
    discarded outputs), and the output (the caller releases what the forward queued)."""
    import torch

    saved: dict[int, Any] = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in weights:
            saved[st.data_ptr()] = st
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return sum(st.nbytes() for st in saved.values()), out


def _measure(runs: list[list[str]]) -> list[dict]:
    """Per run: exchange stats of every step, live bytes per component, activation bytes of one micro-batch."""
    import torch

    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer

    out = []
    for overrides in runs:
        tr = build_trainer(compose(overrides))
        history: list[dict] = []
        pop = tr.module.table.pop_stats
        tr.module.table.pop_stats = lambda: history.append(pop()) or history[-1]
        tr.fit()
        params = list(tr.model.parameters())
        opt_tensors = []
        for o in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer]):
            for state in o.optimizer.state.values():
                opt_tensors += [v for v in state.values() if torch.is_tensor(v)]
            for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups", "shard_fp32_groups"):
                for group in getattr(o, name, None) or []:
                    opt_tensors += list(group)
        t, topt = tr.module.table, tr.module.table_opt
        from megatron.core import parallel_state as ps

        rec = {
            "stage": ps.get_pipeline_model_parallel_rank(),
            "exchange": history,
            "params": _nbytes(params),
            "grads": _nbytes(b.grad_data for b in tr.model.buffers + tr.model.expert_parallel_buffers),
            "optimizer": _nbytes(opt_tensors),
            "table": _nbytes([t.shard]),
            "table_grad": _nbytes([t.shard_grad, t.touched]),
            "table_optimizer": _nbytes([topt.exp_avg, topt.exp_avg_sq, topt.steps]),
        }
        # activations: unique storages autograd saves during one training micro-batch forward (weights excluded)
        from jtok_train.data.datasets import get_microbatch, microbatch_indices

        cfg = tr.cfg
        batch = get_microbatch(tr.train_ds, microbatch_indices(0, 0, tr.dp_rank, tr.dp_size,
                                                               cfg.train.micro_batch_size, cfg.train.global_batch_size))
        weights = {p.untyped_storage().data_ptr() for p in params} | {t.shard.untyped_storage().data_ptr()}
        tr.model.train()
        if not tr.unwrapped.pre_process:   # a later pipeline stage: its input arrives from the previous stage
            m = cfg.model
            sp = cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1
            dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
            tr.unwrapped.set_input_tensor(torch.randn(m.seq_length // sp, cfg.train.micro_batch_size,
                                                      m.hidden_size, dtype=dtype, requires_grad=True))
        rec["activations"], out_ = _saved_bytes(tr.model, batch, weights)
        # a forward whose backward never runs: release what it queued (exchange, full-recompute replays)
        t._in_backward.clear()
        for layer in tr.unwrapped.decoder.layers:
            getattr(layer, "_replay", []).clear()
        del out_
        out.append(rec)
    return out


def _plans(runs: list[list[str]], prefix: str, world: int) -> list[dict]:
    """jtok-plan's capacity figures for each run, the dedup ratio measured on every micro-batch the run trains on."""
    from jtok_train.compat import init_model_parallel
    from jtok_train.config import compose
    from jtok_train.planning.cluster import load_cluster
    from jtok_train.planning.measure import measure_dedup
    from jtok_train.planning.planner import capacity_plan

    init_model_parallel()
    out = []
    for overrides in runs:
        cfg = compose(overrides)
        t = cfg.train
        samples = t.train_iters * t.global_batch_size
        measured = measure_dedup(cfg, prefix, world, samples // t.micro_batch_size, train_samples=samples,
                                 valid_samples=t.eval_samples)
        cluster = load_cluster("cpu_2", [f"gpus={world}", f"gpus_per_node={world}"])
        out.append(capacity_plan(cfg, cluster, dedup_measured=measured))
    return out


def _close(plan: float, measured: float, what: str) -> None:
    assert measured > 0, what
    print(f"{what}: planner {plan:,.0f} vs measured {measured:,.0f} ({100 * (plan / measured - 1):+.2f}%)")
    assert abs(plan - measured) <= TOL * measured, f"{what}: planner {plan:,.0f} vs measured {measured:,.0f} " \
                                                   f"({100 * (plan / measured - 1):+.1f}%)"


@pytest.mark.slow
def test_planner_bytes_and_memory_match_a_2_rank_run(small_dataset, tmp_path):
    common = {"parallel.embedding": "sharded", "train.train_iters": 3}
    runs = [
        # MoE + JTok-M, fp32: every figure including activations
        tiny_overrides(small_dataset, str(tmp_path / "moe"), **common),
        # dense + static JTok, bf16 (bf16 params with fp32 main weights and fp32 gradient buffers)
        tiny_overrides(small_dataset, str(tmp_path / "dense"), dense=True, jtok="jtok", **common,
                       **{"train.precision": "bf16", "jtok.scale_init": 0.5}),
        # TP 2 + sequence parallelism: each TP rank asks for its own half of the sequence; weights split by TP
        tiny_overrides(small_dataset, str(tmp_path / "tp2"), **common,
                       **{"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": "true"}),
    ]
    got = run_distributed(_measure, 2, runs, timeout=900)
    plans = run_distributed(_plans, 1, runs, small_dataset["prefix"], 2, timeout=300)[0]
    for i, plan in enumerate(plans):
        name = ("moe/jtokm/fp32", "dense/jtok/bf16", "moe/jtokm/fp32/tp2+sp")[i]
        # exchange bytes per step per rank (ids + rows forward + row gradients backward), mean over steps and ranks
        steps = [h for rank in got for h in rank[i]["exchange"]]
        assert len(steps) == 6
        sent = sum(h["exchange/bytes_sent"] for h in steps) / len(steps)
        received = sum(h["exchange/bytes_received"] for h in steps) / len(steps)
        assert sent == pytest.approx(received)      # all-to-all: what leaves some rank arrives at another
        ratio = sum(h["exchange/unique_ids"] for h in steps) / sum(h["exchange/positions"] for h in steps)
        assert plan["dedup"]["unique_ratio"] == pytest.approx(ratio, rel=1e-9), name   # the same micro-batches
        _close(plan["exchange"]["dedup"]["bytes_sent"], sent, f"{name} exchange bytes per step")
        remote = sum(h["exchange/rows_remote"] for h in steps) / len(steps)
        _close(plan["exchange"]["dedup"]["remote_rows_per_microbatch"] * plan["layout"]["num_micro"], remote,
               f"{name} remote rows per step")
        # the uniform-owner model (remote share (W-1)/W) is what the planner uses for a cluster without data
        assert plan["exchange"]["remote_fraction"] == pytest.approx(0.5, abs=0.1)
        assert plan["layout"]["tp"] == (2 if "tp2" in name else 1)
        # without dedup every position's row travels: strictly more
        nd, dd = plan["exchange"]["no_dedup"]["bytes_sent"], plan["exchange"]["dedup"]["bytes_sent"]
        assert nd > dd and nd * ratio == pytest.approx(dd, rel=1e-9)
        mem = plan["memory"]
        for rank in got:
            m = rank[i]
            for key in ("params", "grads", "optimizer", "table", "table_grad", "table_optimizer", "activations"):
                _close(mem[key], m[key], f"{name} {key} per rank")


@pytest.mark.slow
def test_planner_memory_with_distributed_optimizer_and_recompute(small_dataset, tmp_path):
    """The distributed optimizer's states per rank (fp32 and bf16) and the activations saved under Megatron's
    recompute (full uniform / block, selective core_attn + layernorm, moe) against live 2-rank runs (MoE +
    JTok-M, sharded tables, fp32: the precision whose activation bookkeeping is exact to 1% above)."""
    common = {"parallel.embedding": "sharded", "train.train_iters": 2}
    cases = {
        "distopt fp32": {"parallel.use_distributed_optimizer": "true"},
        "distopt bf16": {"parallel.use_distributed_optimizer": "true", "train.precision": "bf16"},
        "full uniform 1": {"model.recompute_granularity": "full", "model.recompute_method": "uniform",
                           "model.recompute_num_layers": 1},
        "full block 1": {"model.recompute_granularity": "full", "model.recompute_method": "block",
                         "model.recompute_num_layers": 1},
        "selective core_attn+layernorm": {"model.recompute_granularity": "selective",
                                          "model.recompute_modules": "[core_attn,layernorm]"},
        "selective moe": {"model.recompute_granularity": "selective", "model.recompute_modules": "[moe]"},
    }
    runs = [tiny_overrides(small_dataset, str(tmp_path / str(i)), **common, **extra)
            for i, extra in enumerate(cases.values())]
    got = run_distributed(_measure, 2, runs, timeout=900)
    plans = run_distributed(_plans, 1, runs, small_dataset["prefix"], 2, timeout=300)[0]
    names = list(cases)
    for i, plan in enumerate(plans):
        for rank in got:
            _close(plan["memory"]["optimizer"], rank[i]["optimizer"], f"{names[i]} optimizer per rank")
            if "distopt" not in names[i]:
                _close(plan["memory"]["activations"], rank[i]["activations"], f"{names[i]} activations per rank")


@pytest.mark.slow
def test_planner_per_stage_memory_matches_a_pp2_run(small_dataset, tmp_path):
    """PP 2 on 2 ranks (MoE + JTok-M, sharded tables over each stage's one rank, fp32): each stage's parameters,
    gradients, optimizer states, tables, table optimizer and one micro-batch's activations against the planner's
    figures for that stage (the first holds the embedding, the last the output layer's copy and the logits); the
    planner reports the larger stage and the 1F1B in-flight count and bubble."""
    runs = [tiny_overrides(small_dataset, str(tmp_path / "pp2"), **{"parallel.embedding": "sharded",
                                                                    "train.train_iters": 2,
                                                                    "parallel.pipeline_model_parallel_size": 2})]
    got = run_distributed(_measure, 2, runs, timeout=900)
    plan = run_distributed(_plans, 1, runs, small_dataset["prefix"], 2, timeout=300)[0][0]
    mem = plan["memory"]
    assert len(mem["stages"]) == 2 and mem["total"] == max(mem["per_stage"])
    n = plan["layout"]["num_micro"]
    assert [st["activation_breakdown"]["in_flight"] for st in mem["stages"]] == [min(2, n), 1]
    assert plan["timing"]["pipeline_bubble_share"] == pytest.approx(1 / (n + 1))
    for rank in got:
        m = rank[0]
        st = mem["stages"][m["stage"]]
        for key in ("params", "grads", "optimizer", "table", "table_grad", "table_optimizer"):
            _close(st[key], m[key], f"pp2 stage {m['stage']} {key}")
        _close(st["activation_breakdown"]["per_microbatch"], m["activations"], f"pp2 stage {m['stage']} activations")
    assert {rank[0]["stage"] for rank in got} == {0, 1}


def _measure_chunks(runs: list[list[str]]) -> list[dict]:
    """Interleaved stages: the order in which Megatron's schedule runs each model chunk's forwards and backwards
    (one step), and per rank the live bytes of every chunk together and one forward's activations per chunk."""
    import torch
    from megatron.core import parallel_state as ps

    from jtok_train.config import compose
    from jtok_train.data.datasets import get_microbatch, microbatch_indices
    from jtok_train.training.trainer import build_trainer

    out = []
    for overrides in runs:
        tr = build_trainer(compose(overrides))
        events: list[tuple[str, int]] = []
        forward_step = tr.module._forward_step
        chunk_of = {id(c): v for v, c in enumerate(tr.chunks)}

        def logged_forward(data_iterator, model):
            events.append(("F", chunk_of[id(model)]))
            return forward_step(data_iterator, model)

        tr.module._forward_step = logged_forward
        for v, m in enumerate(tr.unwrapped_chunks):   # a chunk's backward reaches its layers' input last
            m.decoder.register_full_backward_hook(lambda mod, gi, go, v=v: events.append(("B", v)))
        tr.fit()
        params = [p for c in tr.chunks for p in c.parameters()]
        opt_tensors = []
        for o in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer]):
            for state in o.optimizer.state.values():
                opt_tensors += [v for v in state.values() if torch.is_tensor(v)]
        rec = {
            "stage": ps.get_pipeline_model_parallel_rank(),
            "events": events[: 2 * len(tr.chunks) * tr.num_micro],   # the training step's (then the validation)
            "params": _nbytes(params),
            "grads": _nbytes(b.grad_data for c in tr.chunks for b in c.buffers + c.expert_parallel_buffers),
            "optimizer": _nbytes(opt_tensors),
            "table": _nbytes([t.shard for t, _ in tr.module.own_tables]),
            "table_grad": _nbytes([x for t, _ in tr.module.own_tables for x in (t.shard_grad, t.touched)]),
            "table_optimizer": _nbytes([x for _, o in tr.module.own_tables for x in (o.exp_avg, o.exp_avg_sq, o.steps)]),
            "activations": [],
        }
        cfg = tr.cfg
        batch = get_microbatch(tr.train_ds, microbatch_indices(0, 0, tr.dp_rank, tr.dp_size,
                                                               cfg.train.micro_batch_size, cfg.train.global_batch_size))
        weights = {p.untyped_storage().data_ptr() for p in params} | \
            {t.shard.untyped_storage().data_ptr() for t, _ in tr.module.own_tables}
        for chunk, m in zip(tr.chunks, tr.unwrapped_chunks):
            chunk.train()
            if not m.pre_process:
                mc = cfg.model
                m.set_input_tensor(torch.randn(mc.seq_length, cfg.train.micro_batch_size, mc.hidden_size,
                                               requires_grad=True))
            nbytes, out_ = _saved_bytes(chunk, batch, weights)
            rec["activations"].append(nbytes)
            m.token_table._in_backward.clear()
            del out_
        out.append(rec)
    return out


@pytest.mark.slow
def test_planner_interleaved_stages_match_a_vpp2_run(small_dataset, tmp_path):
    """PP 2 x 2 virtual stages on 2 ranks (4 layers, MoE + JTok-M, sharded tables per chunk, fp32): the order of
    forwards and backwards per model chunk that the planner replays equals the one Megatron's interleaved
    schedule runs; each rank's parameters, gradients, optimizer states, tables and table optimizer (all chunks)
    and each chunk's activations of one forward against the planner's figures for that stage and chunk."""
    runs = [tiny_overrides(small_dataset, str(tmp_path / "vpp2"), **{
        "parallel.embedding": "sharded", "train.train_iters": 1, "model.num_layers": 4,
        "parallel.pipeline_model_parallel_size": 2, "parallel.virtual_pipeline_model_parallel_size": 2})]
    got = run_distributed(_measure_chunks, 2, runs, timeout=900)
    plan = run_distributed(_plans, 1, runs, small_dataset["prefix"], 2, timeout=300)[0][0]
    from jtok_train.planning.layout import schedule_events

    mem, n = plan["memory"], plan["layout"]["num_micro"]
    assert n == 4 and len(mem["stages"]) == 2 and mem["total"] == max(mem["per_stage"])
    # Megatron: rank 0 runs 2 (PP - 1) + (V - 1) PP = 4 warm-up forwards, rank 1 two: 5 and 3 in flight
    assert [st["activation_breakdown"]["in_flight"] for st in mem["stages"]] == [5, 3]
    assert plan["timing"]["pipeline_bubble_share"] == pytest.approx(0.5 / (n + 0.5))   # (PP - 1) / V slots
    for rank in got:
        m = rank[0]
        assert m["events"] == schedule_events(2, 2, m["stage"], n), (m["stage"], m["events"])
        st = mem["stages"][m["stage"]]
        for key in ("params", "grads", "optimizer", "table", "table_grad", "table_optimizer"):
            _close(st[key], m[key], f"vpp2 stage {m['stage']} {key}")
        for v, measured in enumerate(m["activations"]):
            _close(st["activation_breakdown"]["per_chunk"][v], measured, f"vpp2 stage {m['stage']} chunk {v} activations")
    assert {rank[0]["stage"] for rank in got} == {0, 1}
