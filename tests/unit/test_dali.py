"""data.loader=dali: the same batches in the same order as the default loader (DALI's CPU operators), and a
clear config error where DALI is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import tiny_overrides

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali-cuda120 not installed (pip install 'jtok-train[gpu]')")
def test_dali_batches_equal_default_loader(small_dataset, tmp_path):
    from jtok_train.data.dali import DaliTrainLoader
    from jtok_train.data.datasets import build_datasets, get_microbatch, microbatch_indices
    from jtok_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(small_dataset["tokenizer"])
    G, m, W, steps, offset = 8, 2, 2, 4, 8
    train_ds, _ = build_datasets([small_dataset["prefix"]], tok, seq_length=32, seed=7, train_samples=offset + steps * G,
                                 valid_samples=4, cache_dir=tmp_path / "cache")
    for rank in range(W):
        loader = DaliTrainLoader(train_ds, micro_batch_size=m, global_batch_size=G, dp_rank=rank, dp_size=W,
                                 start_step=0, end_step=steps, data_offset=offset)
        for step in list(range(steps)) + [1, 2]:      # in order, then a rebuild at step 1 (a resume)
            got = loader.batches(step)
            assert len(got) == G // (m * W)
            for k, b in enumerate(got):
                ref = get_microbatch(train_ds, microbatch_indices(step, k, rank, W, m, G, offset))
                for key in ("tokens", "labels", "loss_mask", "position_ids"):
                    assert b[key].dtype == ref[key].dtype and torch.equal(b[key], ref[key]), (rank, step, k, key)
                assert b["attention_mask"] is None


def test_dali_config_rejected_without_dali(small_dataset, tmp_path, monkeypatch):
    from jtok_train.config import ConfigError, compose, validate
    import jtok_train.data.dali as dali

    cfg = compose(tiny_overrides(small_dataset, str(tmp_path / "r"), **{"data.loader": "dali"}))
    monkeypatch.setattr(dali.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"data.loader='dali' is invalid: NVIDIA DALI is not installed.*"
                                          r"pip install.*data.loader=megatron"):
        validate(cfg)
    bad = compose(tiny_overrides(small_dataset, str(tmp_path / "r"), **{"data.loader": "pytorch"}))
    with pytest.raises(ConfigError, match="data.loader='pytorch' is invalid: megatron or dali"):
        validate(bad)
