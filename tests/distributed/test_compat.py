"""Megatron-Core trains on CPU + gloo through jtok_train.compat, with real processes.

A tiny GPTModel (dense and MoE) is wrapped in Megatron's DistributedDataParallel, stepped 3 times with
Megatron's optimizer and forward-backward schedule, and the losses of world size 2 (DP=2, EP=2, TP=2) must
match world size 1. Weights are set from their global position (fill_params_by_global_position), so every
layout starts from the same model; data of a global batch is split so that every layout sees the same tokens.
Two launches in all (world 1, world 2), each running several configurations, to keep the fixed costs low.
"""

from __future__ import annotations

import math

import pytest

from jtok_train.testing import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, SEQ, GLOBAL_BATCH, MICROBATCHES, STEPS = 128, 32, 8, 2, 3


def _train(kind: str, tp: int = 1, ep: int = 1, sp: bool = False) -> dict[str, list[float]]:
    """Build, wrap and train one model for STEPS steps; return global losses, grad norms, aux losses."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from jtok_train.compat import device, init_model_parallel, install_cpu_compat
    from jtok_train.testing import fill_params_by_global_position

    init_model_parallel(tp=tp, ep=ep, seed=1234)
    install_cpu_compat()  # again: proxies the megatron modules imported above
    moe = kind == "moe"
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1 if ep > 1 else tp,
        sequence_parallel=sp,
        num_moe_experts=4 if moe else None,
        moe_ffn_hidden_size=64 if moe else None,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        # per-sequence balance loss: independent of how the batch is split over ranks
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-2 if moe else 0.0,
    )
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )
    model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False),
        model,
    )
    fill_params_by_global_position(model, seed=7)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=1.0, params_dtype=torch.float32
        ),
        [model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = GLOBAL_BATCH // (MICROBATCHES * dp_size)

    def batches():
        # the same global batch every step (the loss must fall); microbatch i of every layout covers rows
        # [i*GB/M, (i+1)*GB/M) of it, split over DP
        g = torch.Generator().manual_seed(100)
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
        for i in range(MICROBATCHES):
            lo = i * GLOBAL_BATCH // MICROBATCHES + dp_rank * mbs
            rows = tokens[lo : lo + mbs].to(device())
            yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def forward_step(data_iterator, model):
        inputs, labels = next(data_iterator)
        positions = torch.arange(SEQ, device=inputs.device).unsqueeze(0).expand_as(inputs)
        per_token = model(inputs, positions, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            # clone: the schedule divides the returned loss by num_microbatches in place
            return loss, {"lm loss": loss.detach().clone()}

        return per_token, loss_func

    forward_backward = get_forward_backward_func()
    out: dict[str, list[float]] = {"loss": [], "grad_norm": [], "aux": []}
    for step in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        stats = forward_backward(
            forward_step_func=forward_step,
            data_iterator=batches(),
            model=[model],
            num_microbatches=MICROBATCHES,
            seq_length=SEQ,
            micro_batch_size=mbs,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok
        loss = torch.stack([s["lm loss"] for s in stats]).mean()
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        out["loss"].append(loss.item() / dp_size)
        out["grad_norm"].append(float(grad_norm))
        if moe:
            # Megatron's own reduction (sum over TP/CP, AVG over DP: AVG is emulated on gloo by compat)
            from jtok_train.compat.megatron import report_aux_losses

            aux = report_aux_losses(1.0, len(out["aux"]), 2)["seq_load_balancing_loss"]
            out["aux"].append(aux)
    return out


def _run_configs(configs: list[dict]) -> list[dict[str, list[float]]]:
    from jtok_train.compat import destroy_model_parallel

    destroy_model_parallel()
    results = []
    for cfg in configs:
        results.append(_train(**cfg))
        destroy_model_parallel()
    return results


REFERENCE = [dict(kind="dense"), dict(kind="moe")]
PARALLEL = [
    dict(kind="dense"),  # DP=2: each rank half of the global batch
    dict(kind="moe", ep=2),  # EP=2 (and DP=2 for the dense part)
    dict(kind="dense", tp=2, sp=True),  # TP=2 with sequence parallelism
    dict(kind="moe", tp=2, ep=2, sp=True),  # TP=2 x EP=2 (expert TP 1) on 2 ranks
]
MATCHES = {0: 0, 1: 1, 2: 0, 3: 1}  # PARALLEL index -> REFERENCE index


def _parallel_suite() -> dict:
    return {"basics": _collectives_and_rng(), "configs": _run_configs(PARALLEL)}


@pytest.fixture(scope="module")
def runs():
    # two launches for every check below: import megatron.core alone takes 5-10 s per process here
    reference = run_distributed(_run_configs, 1, REFERENCE, timeout=120)[0]
    parallel = run_distributed(_parallel_suite, 2, timeout=180)
    return reference, parallel


def _close(a: list[float], b: list[float], rtol: float) -> bool:
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=1e-7) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("index", range(len(PARALLEL)), ids=lambda i: "-".join(
    f"{k}{v}" for k, v in PARALLEL[i].items()))
@pytest.mark.check
def test_parallel_layout_matches_world_one(runs, index):
    reference, parallel = runs
    ref = reference[MATCHES[index]]
    rank0, rank1 = parallel[0]["configs"][index], parallel[1]["configs"][index]
    assert rank0 == rank1, "ranks disagree on global metrics"
    assert all(math.isfinite(x) for x in ref["loss"])
    assert ref["loss"][0] > ref["loss"][1] > ref["loss"][2], ref["loss"]  # it trains
    assert _close(rank0["loss"], ref["loss"], 1e-5), (rank0["loss"], ref["loss"])
    assert _close(rank0["grad_norm"], ref["grad_norm"], 1e-4), (rank0["grad_norm"], ref["grad_norm"])
    assert _close(rank0["aux"], ref["aux"], 1e-4), (rank0["aux"], ref["aux"])


def _collectives_and_rng() -> list[float]:
    import torch
    import torch.distributed as dist

    from jtok_train.compat import device, init_model_parallel
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    init_model_parallel(tp=2, seed=5)
    t = torch.full((2,), float(dist.get_rank() + 1), device=device())
    dist.all_reduce(t)
    with get_cuda_rng_tracker().fork():  # the tensor-parallel RNG: different per TP rank
        tp_draw = torch.rand(1).item()
    return [t[0].item(), _one_cpu_stream(), tp_draw]


def _one_cpu_stream() -> bool:
    """The CPU stand-in for CUDA streams (what Megatron's and the exchange's stream code runs on CPU): a new side
    stream is the current stream (CPU work is in order: never "on a side stream"), entering it keeps the current
    stream, and the waits, events and records that the code calls run."""
    import torch

    from jtok_train.compat.cpu import _CpuStream

    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    event = current.record_event()
    event.wait(side)
    with torch.cuda.stream(side):
        inside = torch.cuda.current_stream()
    t = torch.ones(2)
    t.record_stream(side)
    return (type(current) is _CpuStream and type(side) is _CpuStream and side == current and inside == current
            and event is not None and current.query())


def test_collectives_streams_and_rng_tracker(runs):
    _, parallel = runs
    (s0, same0, r0), (s1, same1, r1) = parallel[0]["basics"], parallel[1]["basics"]
    assert s0 == s1 == 3.0
    assert same0 is True and same1 is True   # the CPU stream stand-in behaves as one in-order stream
    assert r0 != r1  # the tensor-parallel RNG stream differs per TP rank


def _fail_on_rank_one() -> int:
    import sys
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    return int("megatron.core" in sys.modules)


def test_harness_reports_the_failing_rank():
    from jtok_train.testing import DistributedTestError

    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed.*deliberate failure on rank 1"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def test_harness_rejects_local_functions():
    def local() -> None:
        pass

    with pytest.raises(ValueError, match="module-level"):
        run_distributed(local, 2)
