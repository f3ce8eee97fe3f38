"""Config composition and validation: bad values are rejected with a message naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from jtok_train.config import ConfigError, compose, validate


def test_every_model_and_variant_composes_and_validates():
    for model in ("tiny", "tiny_dense", "dense_s", "dense_xl_1.5b", "moe_1.5b_a250m", "moe_3.2b_a0.5b", "moe_17b_a2b"):
        for jtok in ("none", "jtok", "jtokm"):
            cfg = compose([f"model={model}", f"jtok={jtok}"])
            validate(cfg)
            assert cfg.model.name == model and cfg.jtok.variant == jtok


def test_jtokm_defaults_follow_the_paper():
    j = compose(["jtok=jtokm"]).jtok
    assert (j.num_sets, j.top_k, j.aux_loss_coeff, j.aux_prob, j.depth_scaling) == (5, 2, 1e-4, "sigmoid", True)
    # static JTok: the pilot's defaults (benchmarks/quality/README.md), JTok-M's scale keeps the model's LR
    j = compose(["jtok=jtok"]).jtok
    assert (j.scale_init, j.table_init_std, j.scale_lr_mult) == (1.0, 0.005, 10.0)
    assert compose(["jtok=jtokm"]).jtok.scale_lr_mult == 1.0
    t = compose([]).train
    assert (t.weight_decay, t.clip_grad) == (0.1, 1.0)


def test_unknown_key_is_rejected_by_the_schema():
    # before Hydra composes (whose message would advise appending it with '+'), with or without '+'
    for o in ("model.hiden_size=3", "+model.hiden_size=3"):
        with pytest.raises(ConfigError, match=r"unknown config key model\.hiden_size \(did you mean model\.hidden_size\?\)"):
            compose([o])
    with pytest.raises(ConfigError, match="unknown config key jtok.bogus"):
        compose(["jtok.bogus=1"])
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        compose(["modle.hidden_size=3"])
    # group choices, flags and Hydra's own keys are not keys of the schema
    assert compose(["model=tiny", "hydra.job.chdir=false", "model.hidden_size=64"]).model.hidden_size == 64


@pytest.mark.e2e
def test_the_command_prints_the_unknown_key_and_exits_2():
    """The README's example, taken from the README (its "$ jtok-train ..." line and the line after it) and run
    through the real command line."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    (i,) = [k for k, x in enumerate(lines) if x.strip().startswith("$ jtok-train ")]
    argv, expected = shlex.split(lines[i].strip()[2:])[1:], lines[i + 1].strip()
    out = subprocess.run([sys.executable, "-m", "jtok_train", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == expected
    assert "unknown config key model.hiden_size (did you mean model.hidden_size?)" in expected   # the example


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException, match="hidden_size"):
        compose(["model.hidden_size=wide"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.hidden_size=-8", "model.hidden_size"),
        ("model.num_layers=0", "model.num_layers"),
        ("jtok.top_k=6", "jtok.top_k"),
        ("jtok.num_sets=0", "jtok.num_sets"),
        ("jtok.variant=jtokx", "jtok.variant"),
        ("model.moe_router_topk=9", "model.moe_router_topk"),
        ("train.precision=fp8", "train.precision"),
        ("train.lr_schedule=linear", "train.lr_schedule"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("parallel.sequence_parallel=true", "parallel.sequence_parallel"),
        ("parallel.expert_model_parallel_size=3", "parallel.expert_model_parallel_size"),
        ("parallel.pipeline_model_parallel_size=3", "parallel.pipeline_model_parallel_size"),   # 3 stages, 2 layers
        ("parallel.virtual_pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size"),
        ("model.num_attention_heads=3", "model.num_attention_heads"),
        ("model.transformer_impl=apex", "model.transformer_impl"),
    ],
)
def test_bad_values_name_the_key(override, key):
    cfg = compose(["model=tiny", "jtok=jtokm", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_peak_tflops_is_positive_or_null():
    """train.peak_tflops, the MFU's peak per device: null by default, a positive figure passes; zero or a
    negative one stops with one line naming the value and what to set; the old key points to the new one."""
    assert compose(["model=tiny"]).train.peak_tflops is None
    validate(compose(["model=tiny"]))
    validate(compose(["model=tiny", "train.peak_tflops=989"]))
    for bad in ("0", "-1.5"):
        with pytest.raises(ConfigError) as e:
            validate(compose(["model=tiny", f"train.peak_tflops={bad}"]))
        msg = str(e.value)
        assert msg.startswith(f"train.peak_tflops={float(bad)} is invalid: must be > 0") and "\n" not in msg, msg
        assert "train.peak_tflops=989" in msg and "or null" in msg, msg
    with pytest.raises(ConfigError,
                       match=r"unknown config key train\.peak_flops \(did you mean train\.peak_tflops\?\)"):
        compose(["model=tiny", "train.peak_flops=1e12"])


def test_world_size_and_tokenizer_relations():
    cfg = compose(["model=tiny", "train.micro_batch_size=4", "train.global_batch_size=12"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=12"):
        validate(cfg, world_size=2)
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=4096 .*tokenizer's vocabulary \(5000\)"):
        validate(compose(["model=tiny"]), tokenizer_vocab=5000)


def test_transformer_engine_is_rejected_where_it_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "transformer_engine" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model\.transformer_impl=.*transformer-engine is not installed"):
        validate(compose(["model.transformer_impl=transformer_engine"]))


@pytest.mark.parametrize("overrides,match", [
    (["model.recompute_granularity=all"], r"model\.recompute_granularity='all' is invalid: null, selective or full"),
    (["model.recompute_granularity=full"], r"model\.recompute_method=None is invalid: full recompute needs uniform"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform"], r"model\.recompute_num_layers=None"),
    (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=9"],
     r"model\.recompute_num_layers=9 is invalid: .*\[1, model\.num_layers=4\]"),
    (["model.recompute_method=uniform"], r"model\.recompute_method='uniform' is invalid: is for .*=full"),
    (["model.recompute_modules=[core_attn]"], r"model\.recompute_modules=\['core_attn'\] is invalid: is for .*selective"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[moe_act]"],
     r"must be a non-empty list of core_attn, layernorm, mlp, moe, shared_experts"),
    (["model.recompute_granularity=selective", "model.recompute_modules=[mlp]"], r"mlp needs a dense backbone"),
    (["model=tiny_dense", "model.recompute_granularity=selective", "model.recompute_modules=[moe]"],
     r"moe needs an MoE backbone"),
    (["train.ckpt_optim_format=zero"], r"train\.ckpt_optim_format='zero' is invalid: dp_reshardable or fully_reshardable"),
])
def test_recompute_and_checkpoint_layout_refused_at_config_time(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose(["model=tiny", "jtok=jtokm", *overrides]))


def test_recompute_settings_reach_megatron():
    from jtok_train.model.builder import build_transformer_config

    for extra, want in ((["model.recompute_granularity=full", "model.recompute_method=block",
                          "model.recompute_num_layers=2"], ("full", "block", 2, None)),
                        (["model.recompute_granularity=selective", "model.recompute_modules=[core_attn,moe]"],
                         ("selective", None, None, ["core_attn", "moe"]))):
        cfg = compose(["model=tiny", "jtok=jtokm", *extra])
        validate(cfg)
        tc = build_transformer_config(cfg)
        got = (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers,
               tc.recompute_modules if want[3] else None)
        assert got == want


def test_pipeline_layouts_that_cannot_work_are_refused():
    """A PP layout that divides the layers is accepted, with full recompute of JTok layers too; interleaved
    stages need PP > 1, PP x VPP dividing the layers and a micro-batch count the interleaved schedule takes
    (a multiple of PP): each refusal names the key and the fix."""
    base = ["model=tiny", "jtok=jtokm", "parallel.pipeline_model_parallel_size=2"]    # tiny: 4 layers
    validate(compose(base))
    validate(compose(base + ["model.recompute_granularity=full", "model.recompute_method=uniform",
                             "model.recompute_num_layers=1"]))
    vpp = base + ["parallel.virtual_pipeline_model_parallel_size=2", "train.micro_batch_size=2",
                  "train.global_batch_size=8", "train.eval_samples=8"]
    validate(compose(vpp), world_size=2)            # 4 micro-batches per step on each of the 2 stages
    with pytest.raises(ConfigError, match=r"parallel\.virtual_pipeline_model_parallel_size=3 is invalid: pipeline "
                                          r"stages x virtual stages = 2 x 3 must divide model\.num_layers=4"):
        validate(compose(base + ["parallel.virtual_pipeline_model_parallel_size=3"]))
    with pytest.raises(ConfigError, match=r"parallel\.virtual_pipeline_model_parallel_size=0 is invalid"):
        validate(compose(base + ["parallel.virtual_pipeline_model_parallel_size=0"]))
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=6 is invalid: gives 3 micro-batches per step; "
                                          r"the interleaved pipeline needs a multiple of .*=2: make it a multiple of 4"):
        validate(compose(vpp + ["train.global_batch_size=6"]), world_size=2)
    with pytest.raises(ConfigError, match=r"train\.eval_samples=2 is invalid: gives 1 micro-batches"):
        validate(compose(vpp + ["train.eval_samples=2"]), world_size=2)
    with pytest.raises(ConfigError, match=r"virtual_pipeline_model_parallel_size=2 is invalid: interleaved stages "
                                          r"need parallel\.pipeline_model_parallel_size > 1"):
        validate(compose(["model=tiny", "parallel.virtual_pipeline_model_parallel_size=2"]))


def test_a_saved_config_with_a_retired_key_still_loads():
    """data.num_workers did nothing and was dropped; a checkpoint's saved config that holds it still merges
    into the schema (and the key is gone), while a user override of it is refused as unknown."""
    from omegaconf import OmegaConf

    from jtok_train.config import ConfigError, compose
    from jtok_train.config.schema import RunConfig, drop_retired_keys

    saved = OmegaConf.to_container(compose(["model=tiny"]), resolve=True)
    saved["data"]["num_workers"] = 4
    saved["train"]["peak_flops"] = 0.0        # renamed train.peak_tflops
    try:
        OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(saved))
        raise AssertionError("the schema still accepts data.num_workers")
    except Exception as e:   # noqa: BLE001 - OmegaConf's ConfigKeyError
        assert "num_workers" in str(e)
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), drop_retired_keys(saved))
    assert "num_workers" not in cfg.data and cfg.model.num_layers == saved["model"]["num_layers"]
    assert "peak_flops" not in cfg.train and cfg.train.peak_tflops is None
    import pytest

    with pytest.raises((ConfigError, Exception), match="num_workers"):
        compose(["model=tiny", "data.num_workers=2"])


def test_a_key_a_checkpoint_lacks_counts_as_its_default_and_a_changed_one_is_named():
    """A checkpoint written before a config key existed resumes (the key is added with the default that keeps
    the earlier behaviour); a value that differs from the saved one is named in the refusal."""
    from omegaconf import OmegaConf

    from jtok_train.checkpoint.fingerprint import config_differences
    from jtok_train.config import compose

    cfg = compose(["model=tiny", "jtok=jtokm"])      # scale_lr_mult at its schema default, 1
    saved = OmegaConf.to_yaml(cfg)
    older = saved.replace("  scale_lr_mult: 1.0\n", "")
    assert older != saved and "scale_lr_mult" not in older
    assert config_differences(older, cfg) == []
    assert config_differences(older, compose(["model=tiny", "jtok=jtokm", "jtok.scale_lr_mult=10"])) == [
        "jtok.scale_lr_mult: 1.0 -> 10.0"]
    # a key the saved config has and the current one lacks is still a difference
    assert config_differences(saved.replace("  scale_lr_mult: 1.0\n", "  scale_lr_mult: 1.0\n  extra_key: 3\n"),
                              cfg) == ["jtok.extra_key: 3 -> '<absent>'"]
    with pytest.raises(Exception, match=r"jtok.scale_lr_mult=0"):
        from jtok_train.config.schema import validate
        validate(compose(["model=tiny", "jtok=jtok", "jtok.scale_lr_mult=0"]), world_size=1)
