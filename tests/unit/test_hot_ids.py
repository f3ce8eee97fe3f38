"""The data's token counts and the hot ids they give (parallel.hot_rows), and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_build_counts_every_token_and_stats_rewrites_the_counts(small_dataset, tmp_path):
    from jtok_train.data.counts import HotRowsError, counts_path, hot_token_ids

    prefix = small_dataset["prefix"]
    toks = np.fromfile(prefix + ".bin", dtype=json.loads((Path(prefix).parent / "manifest.json").read_text())["dtype"])
    counts = np.load(counts_path(prefix))
    assert np.array_equal(counts, np.bincount(toks)) and counts.sum() == len(toks)
    manifest = json.loads((Path(prefix).parent / "manifest.json").read_text())
    assert manifest["token_counts"] == ["text_document.counts.npy"]
    # the 8 most frequent ids, ties to the smaller id, ascending
    want = np.sort(np.argsort(-counts, kind="stable")[:8])
    assert np.array_equal(hot_token_ids([prefix], 8, 512), want)
    assert np.array_equal(hot_token_ids([prefix, prefix], 8, 512), want)      # a blend adds the counts
    # stats --count-ids writes them for a dataset without (a copy of the dataset, counts removed)
    copy = tmp_path / "copy"
    copy.mkdir()
    for ext in (".bin", ".idx"):
        (copy / f"text_document{ext}").write_bytes(Path(prefix + ext).read_bytes())
    with pytest.raises(HotRowsError, match="jtok-data stats .* --count-ids"):
        hot_token_ids([str(copy / "text_document")], 8, 512)
    proc = subprocess.run([sys.executable, "-m", "jtok_train.cli.data", "stats", str(copy / "text_document"),
                           "--count-ids"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "share of tokens of the most frequent ids: top 256:" in proc.stdout
    assert np.array_equal(np.load(counts_path(str(copy / "text_document"))), counts)


def test_hot_ids_file_and_its_errors(small_dataset, tmp_path):
    from jtok_train.data.counts import HotRowsError, hot_token_ids

    ids = tmp_path / "ids.txt"
    ids.write_text("7\n3\n100\n5\n")
    assert hot_token_ids([], 3, 512, str(ids)).tolist() == [3, 7, 100]
    np.save(tmp_path / "ids.npy", np.array([9, 1]))
    assert hot_token_ids([], 2, 512, str(tmp_path / "ids.npy")).tolist() == [1, 9]
    for text, h, fragment in (("1\n1\n", 2, "lists an id twice"), ("1\n2\n", 3, "lists only 2 ids"),
                              ("1\n600\n", 2, "outside the vocabulary"), ("a b\n", 1, "not a list of token ids")):
        ids.write_text(text)
        with pytest.raises(HotRowsError, match=fragment) as e:
            hot_token_ids([], h, 512, str(ids))
        assert "\n" not in str(e.value)
    with pytest.raises(HotRowsError, match="no such file"):
        hot_token_ids([], 2, 512, str(tmp_path / "missing.txt"))


def test_config_refuses_hot_rows_without_sharded_tables():
    from jtok_train.config import ConfigError, compose, validate

    with pytest.raises(ConfigError, match="parallel.hot_rows=8 is invalid: hot rows are replicas of sharded"):
        validate(compose(["model=tiny", "jtok=jtokm", "parallel.hot_rows=8"]))
    with pytest.raises(ConfigError, match="parallel.hot_rows=8 is invalid"):
        validate(compose(["model=tiny", "jtok=none", "parallel.embedding=sharded", "parallel.hot_rows=8"]))
    with pytest.raises(ConfigError, match="must be at most model.vocab_size"):
        validate(compose(["model=tiny", "jtok=jtokm", "parallel.embedding=sharded", "parallel.hot_rows=100000"]))
    validate(compose(["model=tiny", "jtok=jtokm", "parallel.embedding=sharded", "parallel.hot_rows=8"]))
