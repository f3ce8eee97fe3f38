"""The trainer on real gloo processes: 1 rank vs 2 ranks (data parallel, expert parallel, sharded tables with the
distributed optimizer) end with the same weights and optimizer states; bf16 tracks fp32; the model with
jtok=none is Megatron's GPTModel, bitwise."""

from __future__ import annotations

import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed


# Every comparison trains STEPS steps at a learning rate that lowers the loss by more than 10% (asserted), then
# compares every tensor of the model (backbone, JTok parameters, tables) and of the optimizer states at its
# global shape (jtok_train.testing.state.global_state), not the losses alone.
STEPS = 6
LEARNING = {"train.train_iters": STEPS, "train.lr": 1e-2, "train.min_lr": 1e-3, "train.warmup_fraction": 0.0}
# 1 rank vs 2 ranks in fp32: the same samples, but the gradient sums run in another order (1 rank adds its 4
# micro-batches in turn, 2 ranks add 2 each and then each other; EP adds expert outputs per rank), so the
# results agree to rounding, not bitwise. Measured after 6 steps: the median tensor within 1e-6 relative
# (norm of the difference / norm), the worst (the input embedding, whose rows sum many positions) 3e-6 at DP 2
# and 2e-5 at EP 2; on another CPU type (AMD EPYC: CPU kernels round sums by their vector width) the median at
# EP 2 was 1.1e-6. A wrong gradient (a missing 1/DP, a dropped micro-batch, a wrong expert) moves whole
# tensors by 1e-2 or more after 6 steps at this learning rate.
REL_WORST, REL_MEDIAN = 5e-5, 5e-6


def _train_many(runs: list[list[str]]) -> list[dict]:
    """Train each override list in turn on this rank; return losses and the global state per run."""
    from jtok_train.config import compose
    from jtok_train.testing import fill_params_by_global_position
    from jtok_train.testing.state import global_state
    from jtok_train.training.trainer import build_trainer

    out = []
    for overrides in runs:
        cfg = compose(overrides)
        tr = build_trainer(cfg, param_init=lambda m: fill_params_by_global_position(m, seed=3, skip=("token_table",)))
        res = tr.fit()
        out.append({"losses": res.losses, "valid": res.valid_loss, "state": global_state(tr)})
    return out


def _train_each(runs: list[list[str]], world_size: int, rounded: tuple[int, ...] = ()) -> list[list[dict]]:
    """Each run in its own processes (per rank: results[rank][run]): every model is built from its own seed in a
    process that built nothing before, as in training (Megatron keeps state across model builds in a process:
    a JTok-M router at EP 2 built after other models drifted from the same model built first). A rank starts in
    under a second (run_distributed's fork server), so this costs little. ``rounded``: indices of runs whose
    weights are rounded to bf16 after every optimizer step (_train_rounded)."""
    per_run = [run_distributed(_train_rounded if i in rounded else _train_many, world_size, [r], timeout=900)
               for i, r in enumerate(runs)]
    return [[res[rank][0] for res in per_run] for rank in range(world_size)]


def _train_rounded(runs: list[list[str]]) -> list[dict]:
    """_train_many with bf16 storage and fp32 arithmetic: after every optimizer step every model weight is
    rounded to bf16 in place (the fp32 optimizer then steps the rounded weights). The reference for how far
    bf16's rounding alone moves an fp32 training (test_bf16_tracks_fp32_weights_and_learns_as_much)."""
    import torch

    from jtok_train.training.train_module import TrainModule

    real = TrainModule.train_step

    def rounded(self, batches):
        out = real(self, batches)
        with torch.no_grad():
            for chunk in self.chunks:
                for p in chunk.parameters():
                    p.copy_(p.to(torch.bfloat16).to(p.dtype))
        return out

    TrainModule.train_step = rounded
    try:
        return _train_many(runs)
    finally:
        TrainModule.train_step = real


def _assert_close(want: dict, have: dict, name: str, keys: tuple = ("model/", "optim/", "extra/")) -> None:
    import statistics

    from jtok_train.testing.state import compare_states

    diffs = compare_states(want["state"], have["state"], rel=float("inf"), prefixes=keys)
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert worst[0][1] <= REL_WORST, (name, worst, want["losses"], have["losses"])
    assert statistics.median(diffs.values()) <= REL_MEDIAN, (name, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
    assert any(k.startswith("optim/exp_avg_sq/") for k in diffs) and any("experts" in k or "mlp" in k for k in diffs)
    assert have["losses"] == pytest.approx(want["losses"], rel=1e-5), name


def _learned(run: dict, name: str) -> None:
    first, last = run["losses"][0], run["losses"][-1]
    assert len(run["losses"]) == STEPS and last < 0.9 * first, f"{name}: loss {first:.3f} -> {last:.3f}, not 10% lower"


def test_one_rank_vs_two_ranks_same_weights_and_optimizer_states(small_dataset, tmp_path):
    cases = {
        "dense_jtokm_dp": (dict(dense=True), {}),
        "moe_jtokm_dp": (dict(), {}),
        "moe_jtok_dp": (dict(jtok="jtok", **{"jtok.scale_init": 0.5}), {}),
        "moe_jtokm_ep2": (dict(), {"parallel.expert_model_parallel_size": 2}),
        "moe_jtokm_sharded_distopt": (dict(), {"parallel.embedding": "sharded",
                                               "parallel.use_distributed_optimizer": "true"}),
    }
    ref_runs, dist_runs = [], []
    for name, (kw, par) in cases.items():
        ref_runs.append(tiny_overrides(small_dataset, str(tmp_path / f"{name}_w1"), **kw, **LEARNING))
        dist_runs.append(tiny_overrides(small_dataset, str(tmp_path / f"{name}_w2"), **kw, **LEARNING, **par))
    # the 1-rank reference of the EP2 case is the same model at EP1; the sharded + distributed-optimizer case
    # is held against the replicated plain-optimizer model (weights and Adam moments: the distributed
    # optimizer also stores fp32 main weights, the sharded table its moments under extra/)
    ref = _train_each(ref_runs[:3], 1)[0]
    got = _train_each(dist_runs, 2)
    expected = {"dense_jtokm_dp": ref[0], "moe_jtokm_dp": ref[1], "moe_jtok_dp": ref[2], "moe_jtokm_ep2": ref[1]}
    for (name, want), have in zip(expected.items(), got[0]):
        _learned(want, name)
        _assert_close(want, have, name)
    sharded = got[0][4]
    from jtok_train.testing.state import compare_states

    # the sharded table in permuted row order vs the replicated one in token order: compare through the trainer's
    # own views instead (both runs end with the same weights everywhere else)
    # the backbone's weights and its Adam moments (Adam's scale invariance and clipping at 1.0 would hide a
    # uniform gradient-scale error from the weights, not from exp_avg / exp_avg_sq)
    backbone = tuple(k for k in ref[1]["state"] if k.startswith(("model/", "optim/exp_avg/", "optim/exp_avg_sq/"))
                     and "token_table" not in k)
    assert set(backbone) <= set(sharded["state"]), sorted(set(backbone) - set(sharded["state"]))[:5]
    diffs = compare_states({k: ref[1]["state"][k] for k in backbone}, {k: sharded["state"][k] for k in backbone},
                           rel=REL_WORST)
    assert len(diffs) == len(backbone) and sum(k.startswith("optim/exp_avg_sq/") for k in diffs) > 10
    assert sharded["losses"] == pytest.approx(ref[1]["losses"], rel=1e-5)
    # the table and its Adam moments: stored in permuted row order by the sharded table, in token order by the
    # replicated one (row q of the permuted table is token perm[q])
    from jtok_train.tables.init import row_permutation

    from jtok_train.config import compose

    perm = row_permutation(512, compose(dist_runs[4]).jtok.table_seed).numpy()
    pairs = {"model/module.token_table.shard": "model/module.token_table.weight",
             "extra/table_optimizer/exp_avg": "optim/exp_avg/module.token_table.weight",
             "extra/table_optimizer/exp_avg_sq": "optim/exp_avg_sq/module.token_table.weight"}
    for sk, rk in pairs.items():
        diffs = compare_states({"model/t": ref[1]["state"][rk][perm]}, {"model/t": sharded["state"][sk]},
                               rel=float("inf"))
        assert diffs["model/t"] <= REL_WORST, (sk, diffs)


@pytest.mark.check
def test_bf16_tracks_fp32_weights_and_learns_as_much(small_dataset, tmp_path):
    """train.precision=bf16 (bf16 weights and activations, fp32 main weights in Megatron's optimizer) against fp32,
    replicated and sharded tables, plain and distributed optimizer: every weight (the tables included) as close to
    fp32 as bf16's rounding explains, the loss falls as far."""
    runs = [tiny_overrides(small_dataset, str(tmp_path / "fp32"), **LEARNING),
            tiny_overrides(small_dataset, str(tmp_path / "bf16"), **LEARNING, **{"train.precision": "bf16"}),
            tiny_overrides(small_dataset, str(tmp_path / "bf16s"), **LEARNING, **{
                "train.precision": "bf16", "parallel.embedding": "sharded",
                "parallel.use_distributed_optimizer": "true"}),
            tiny_overrides(small_dataset, str(tmp_path / "rounded"), **LEARNING)]
    fp32, bf16, bf16s, rounded = _train_each(runs, 2, rounded=(3,))[0]
    import statistics

    import numpy as np
    import torch

    from jtok_train.config import compose
    from jtok_train.tables.init import row_permutation
    from jtok_train.testing.state import compare_states

    _learned(fp32, "fp32")
    fall = fp32["losses"][0] - fp32["losses"][-1]
    perm = row_permutation(512, compose(runs[2]).jtok.table_seed).numpy()

    def weights(run: dict) -> dict:
        """Every model weight in token order (the sharded table's permuted rows put back)."""
        out = {k: v for k, v in run["state"].items() if k.startswith("model/")}
        if "model/module.token_table.shard" in out:
            shard = out.pop("model/module.token_table.shard")
            table = np.empty_like(shard)
            table[perm] = shard           # row q of the permuted table is token perm[q]
            out["model/module.token_table.weight"] = table
        return out

    # The bound, from a measurement in this test: "rounded" is fp32 training whose weights are rounded to bf16
    # after every step (bf16 storage, fp32 arithmetic): how far bf16's rounding alone moves 6 Adam steps at lr
    # 1e-2 (Adam's steps are about +-lr whatever the gradient's size, with a sign that rounding flips where a
    # gradient is small, and the MoE router's top-k choices flip with it). A bf16 run rounds the weights the same
    # way and, in the forward and backward, the activations and their products: the same relative size (2^-9)
    # per operation, so its distance from fp32 is a small multiple of the rounded run's. Measured (2 ranks, this
    # test's sizes): rounded run median 0.026, worst 0.18 (the MoE
    # router); bf16 median 0.097 (3.8x), worst 0.28 (1.5x, the table); bf16 sharded + distopt 0.093, 0.25. The
    # bounds, 6x the median and 2.5x the worst, leave room for another CPU's rounding. A broken bf16 path (fp32
    # main weights not applied, a table left in fp32 or not updated, gradients not reduced) shows as O(1) or a
    # loss that does not fall; the exact check below ties the bf16 weights to Megatron's fp32 main weights.
    ref = compare_states(weights(fp32), weights(rounded), rel=float("inf"))
    ref_median, ref_worst = statistics.median(ref.values()), max(ref.values())
    assert "model/module.token_table.weight" in ref and ref_median > 0, ref_median
    for got, name in ((bf16, "bf16"), (bf16s, "bf16 sharded distopt")):
        diffs = compare_states(weights(fp32), weights(got), rel=float("inf"))
        worst = sorted(diffs.items(), key=lambda kv: -kv[1])
        assert len(diffs) > 10 and "model/module.token_table.weight" in diffs, name
        assert statistics.median(diffs.values()) <= BF16_MEDIAN_FACTOR * ref_median, (name, ref_median, worst[:6])
        assert worst[0][1] <= BF16_WORST_FACTOR * ref_worst, (name, ref_worst, worst[:6])
        # every bf16 model weight is its fp32 main weight rounded to bf16, bitwise (plain: fp32_param, distributed
        # optimizer: param)
        keys = tuple(k for k in fp32["state"] if k.startswith("model/") and "token_table" not in k)
        main = {k.split("/", 2)[2]: v for k, v in got["state"].items() if k.startswith(("optim/fp32_param/",
                                                                                       "optim/param/"))}
        assert len(main) >= len(keys), (name, len(main))
        for k, v in main.items():
            as_bf16 = torch.from_numpy(v).to(torch.bfloat16).float().numpy()
            assert np.array_equal(as_bf16, got["state"][f"model/{k}"]), (name, k)
        assert got["losses"][0] - got["losses"][-1] >= 0.9 * fall, (name, got["losses"], fp32["losses"])
        assert got["valid"] == pytest.approx(fp32["valid"], rel=2e-2), name


BF16_MEDIAN_FACTOR, BF16_WORST_FACTOR = 6.0, 2.5   # measured 3.8x and 1.5x (the test's comment)


def _none_is_plain_gptmodel() -> dict:
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from jtok_train.compat import init_model_parallel
    from jtok_train.config import compose
    from jtok_train.model.builder import build_model, build_transformer_config

    results = {}
    for dense in (True, False):
        o = ["model=tiny_dense" if dense else "model=tiny", "jtok=none", "model.vocab_size=512",
             "model.seq_length=32", "data.tokenizer=unused"]
        cfg = compose(o)
        init_model_parallel(seed=11)
        ours = build_model(cfg)
        init_model_parallel(seed=11)
        tc = build_transformer_config(cfg)
        plain = GPTModel(
            config=tc,
            transformer_layer_spec=get_gpt_layer_local_spec(num_experts=cfg.model.num_experts, normalization="RMSNorm"),
            vocab_size=512, max_sequence_length=32, share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
        )
        assert type(ours) is GPTModel
        sd1, sd2 = ours.state_dict(), plain.state_dict()
        assert list(sd1) == list(sd2)
        assert all(torch.equal(sd1[k], sd2[k]) for k in sd1 if torch.is_tensor(sd1[k]))
        ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(32).expand(2, 32)
        assert torch.equal(ours(ids, pos, None), plain(ids, pos, None))

        # JTok and JTok-M with s = 0 compute exactly the backbone (given the backbone's weights).
        for variant in ("jtok", "jtokm"):
            cfgj = compose(o[:1] + [f"jtok={variant}", "jtok.scale_init=0.0"] + o[2:])
            init_model_parallel(seed=11)
            jm = build_model(cfgj)
            missing = jm.load_state_dict(plain.state_dict(), strict=False)
            assert all(".jtok." in k or k.startswith("token_table") for k in missing.missing_keys), missing
            assert torch.equal(jm(ids, pos, None), plain(ids, pos, None)), variant
        results["dense" if dense else "moe"] = True
    return results


def test_jtok_none_is_megatron_gptmodel_bitwise():
    assert run_distributed(_none_is_plain_gptmodel, 1, timeout=300) == [{"dense": True, "moe": True}]
