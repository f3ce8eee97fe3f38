"""jtok_train.compat.megatron on the installed megatron-core (0.16.x and 0.19.x): a checkpoint has the same
layout on both (torch_dist files + common.pt, no common state pickled inside the torch_dist files), and the
patches of private Megatron names are undone when their block ends."""

from __future__ import annotations

from pathlib import Path

from jtok_train.testing import run_distributed


def _save_and_load(root: str) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from jtok_train.checkpoint import load_sharded_state, read_dcp_metadata, read_meta, save_strategy

    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(root) / "ckpt"
    if rank == 0:
        path.mkdir(parents=True)
    dist.barrier()
    local = torch.arange(4, dtype=torch.float32) + 4 * rank
    meta = {"format": 1, "step": 7}
    state = {"w": ShardedTensor.from_rank_offsets("w", local.clone(), (0, rank, world), replica_id=0), "meta": meta}
    dist_checkpointing.save(state, str(path), sharded_strategy=save_strategy())
    dist.barrier()
    keys = sorted(read_dcp_metadata(path).state_dict_metadata)
    target = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4), (0, rank, world), replica_id=0)}
    loaded, missing, unexpected = load_sharded_state(target, path, "the test state")
    return {"files": sorted(p.name for p in path.iterdir()), "keys": keys, "meta": read_meta(path),
            "w": loaded["w"].tolist(), "expected": local.tolist(), "missing": sorted(missing),
            "unexpected": sorted(unexpected), "loaded_meta": loaded.get("meta")}


def test_checkpoint_layout_is_the_same_on_every_supported_version(tmp_path):
    for got in run_distributed(_save_and_load, 2, str(tmp_path), timeout=300):
        assert "common.pt" in got["files"] and "metadata.json" in got["files"], got["files"]
        assert got["keys"] == ["w"], got["keys"]        # the common state is not inside the torch_dist files
        assert got["meta"] == {"format": 1, "step": 7}
        assert got["loaded_meta"] == {"format": 1, "step": 7}
        assert got["w"] == got["expected"]
        assert got["missing"] == [] and got["unexpected"] == []


def test_patches_are_undone():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    from jtok_train.compat import megatron as mc

    before_planner = dict(MCoreLoadPlanner.__dict__)
    before_filter = MegatronOptimizer.__dict__["_filter_and_reorder_param_groups"]
    seen = []
    with mc.replace_load_bytes(lambda value, fqn: None):
        assert "load_bytes" in MCoreLoadPlanner.__dict__
    with mc.replace_param_group_matching(lambda original: seen.append(original) or original):
        assert MegatronOptimizer.__dict__["_filter_and_reorder_param_groups"] is not before_filter
    assert dict(MCoreLoadPlanner.__dict__) == before_planner
    assert MegatronOptimizer.__dict__["_filter_and_reorder_param_groups"] is before_filter
    assert seen == [before_filter.__func__]
    keys = mc.param_group_identifier_keys()
    assert {"wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr"} <= set(keys)


def test_version_line_and_one_warning_for_an_untested_megatron(monkeypatch):
    import subprocess
    import sys
    import warnings
    from importlib import metadata

    from jtok_train.compat import megatron as mc

    out = subprocess.run([sys.executable, "-m", "jtok_train", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"megatron-core {metadata.version('megatron-core')}" in out.stdout and "torch " in out.stdout
    assert metadata.version("megatron-core") in mc.TESTED_MEGATRON          # CI runs a tested release
    assert mc.warn_if_untested() is None
    monkeypatch.setattr(mc, "versions", lambda: {"megatron-core": "0.21.0"})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first, second = mc.warn_if_untested(), mc.warn_if_untested()
    assert first and "0.21.0" in first and "0.16.1, 0.19.2" in first and second is None
    assert len([w for w in seen if "0.21.0" in str(w.message)]) == 1
