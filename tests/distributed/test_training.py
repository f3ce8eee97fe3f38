"""The trainer on real gloo processes: 1 rank vs 2 ranks (data parallel, expert parallel) give the same
losses on the same data; the model with jtok=none is Megatron's GPTModel, bitwise."""

from __future__ import annotations

import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed


def _train_many(runs: list[list[str]]) -> list[dict]:
    """Train each override list in turn on this rank; return losses per run."""
    import torch

    from jtok_train.config import compose
    from jtok_train.testing import fill_params_by_global_position
    from jtok_train.training.trainer import Trainer

    out = []
    for overrides in runs:
        cfg = compose(overrides)
        res = Trainer(cfg, param_init=lambda m: fill_params_by_global_position(m, seed=3)).fit()
        out.append({"losses": res.losses, "valid": res.valid_loss})
    return out


def test_one_rank_vs_two_ranks_same_losses(small_dataset, tmp_path):
    cases = {
        "dense_jtokm_dp": (dict(dense=True), {}),
        "moe_jtokm_dp": (dict(), {}),
        "moe_jtok_dp": (dict(jtok="jtok", **{"jtok.scale_init": 0.5}), {}),
        "moe_jtokm_ep2": (dict(), {"parallel.expert_model_parallel_size": 2}),
    }
    ref_runs, dist_runs = [], []
    for name, (kw, par) in cases.items():
        ref_runs.append(tiny_overrides(small_dataset, str(tmp_path / f"{name}_w1"), **kw))
        dist_runs.append(tiny_overrides(small_dataset, str(tmp_path / f"{name}_w2"), **kw, **par))
    # the 1-rank reference of the EP2 case is the same model at EP1 (already in the list as moe_jtokm_dp)
    ref = run_distributed(_train_many, 1, ref_runs[:3], timeout=600)[0]
    got = run_distributed(_train_many, 2, dist_runs, timeout=600)
    assert got[0] == got[1], "ranks disagree on the reduced losses"
    expected = {"dense_jtokm_dp": ref[0], "moe_jtokm_dp": ref[1], "moe_jtok_dp": ref[2], "moe_jtokm_ep2": ref[1]}
    for (name, want), have in zip(expected.items(), got[0]):
        assert len(have["losses"]) == 3
        assert have["losses"] == pytest.approx(want["losses"], rel=1e-4), name
        assert have["valid"] == pytest.approx(want["valid"], rel=1e-4), name
        assert want["losses"][-1] < want["losses"][0], f"{name}: loss did not go down"


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


def test_bf16_replicated_and_sharded_track_fp32(small_dataset, tmp_path):
    """train.precision=bf16 (bf16 weights and activations, fp32 main weights in Megatron's optimizer) follows the
    fp32 run closely, with replicated and with sharded tables."""
    runs = [tiny_overrides(small_dataset, str(tmp_path / "fp32")),
            tiny_overrides(small_dataset, str(tmp_path / "bf16"), **{"train.precision": "bf16"}),
            tiny_overrides(small_dataset, str(tmp_path / "bf16s"), **{"train.precision": "bf16",
                                                                       "parallel.embedding": "sharded"})]
    fp32, bf16, bf16s = run_distributed(_train_many, 2, runs, timeout=600)[0]
    for got in (bf16, bf16s):
        assert got["losses"] == pytest.approx(fp32["losses"], rel=2e-2)
        assert got["valid"] == pytest.approx(fp32["valid"], rel=2e-2)
