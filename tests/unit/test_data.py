"""Data path: corpus -> tokenizer -> indexed dataset -> Megatron GPT datasets -> rank-independent batches.

Runs on real text: a few files of the Python 3.11 docs (Debian python3.11-doc) when installed, otherwise
modules of the running interpreter's standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from jtok_train.data.build import build_dataset, dataset_stats, fingerprint_inputs, unique_ratio_per_window
from jtok_train.data.corpus import (
    CorpusError,
    find_python_docs,
    iter_corpus,
    iter_documents,
    split_on_headings,
)
from jtok_train.data.indexed import DataFileError, check_token_range, read_documents, validate_indexed
from jtok_train.data.tokenizer import EOD_TOKEN, load_tokenizer, train_tokenizer

VOCAB = 1024


def _real_text_dirs(root: Path) -> tuple[Path, Path]:
    """Two directories of real text (A larger than B), copied into ``root``."""
    a, b = root / "corpus_a", root / "corpus_b"
    a.mkdir()
    b.mkdir()
    try:
        docs = find_python_docs()
        sets = [(a, sorted((docs / "tutorial").glob("*.rst.txt"))), (b, sorted((docs / "faq").glob("*.rst.txt")))]
    except CorpusError:
        lib = Path(sysconfig.get_paths()["stdlib"])
        mods_a = ("argparse textwrap functools string fractions heapq bisect calendar csv difflib dataclasses "
                  "enum gettext pprint shutil").split()
        mods_b = "shlex glob fnmatch base64 colorsys copy keyword numbers operator queue".split()
        sets = [(a, [lib / f"{m}.py" for m in mods_a]), (b, [lib / f"{m}.py" for m in mods_b])]
    for dst, files in sets:
        for f in files:
            # .txt so the default directory reader picks them up (the stdlib fallback has .py files)
            shutil.copy(f, dst / (f.name if f.name.endswith((".txt", ".md", ".rst")) else f.name + ".txt"))
    return a, b


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Corpus A and B built into datasets sharing A's tokenizer."""
    root = tmp_path_factory.mktemp("data")
    a, b = _real_text_dirs(root)
    ra = build_dataset(str(a), root / "out_a", vocab_size=VOCAB, log=lambda *_: None)
    rb = build_dataset(str(b), root / "out_b", tokenizer_path=root / "out_a" / "tokenizer.json",
                       log=lambda *_: None)
    tok = load_tokenizer(root / "out_a" / "tokenizer.json")
    return {"root": root, "a": a, "b": b, "ra": ra, "rb": rb, "tok": tok}


# --------------------------------------------------------------------------------------------- corpus


def test_corpus_deterministic_and_split_on_headings(built):
    a = built["a"]
    d1 = list(iter_documents(a))
    d2 = list(iter_documents(a))
    assert d1 == d2 and len(d1) >= 5
    names = [d.name.split("#")[0] for d in d1]
    assert names == sorted(names)
    # splitting large files on headings loses nothing: the parts of each file join back to it
    small = list(iter_documents(a, max_doc_chars=1000))
    assert len(small) > len(d1) // 2
    for f in sorted(a.iterdir()):
        parts = [d.text for d in small if d.name.split("#")[0] == f.name]
        assert "".join(parts) == f.read_text(encoding="utf-8", errors="replace")
    rst = "Title\n=====\n\nintro\n\nSec A\n-----\n\ntext a\n\nSub\n~~~\n\nx\n\nSec B\n-----\n\ntext b\n"
    assert split_on_headings(rst) == ["Title\n=====\n\nintro\n\n", "Sec A\n-----\n\ntext a\n\nSub\n~~~\n\nx\n\n",
                                      "Sec B\n-----\n\ntext b\n"]


def test_corpus_errors_and_jsonl(tmp_path):
    with pytest.raises(CorpusError, match="apt-get install -y python3.11-doc"):
        find_python_docs(candidates=[str(tmp_path / "nope")])
    with pytest.raises(CorpusError, match="no such directory"):
        list(iter_corpus(str(tmp_path / "missing")))
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world", "id": 3}) + "\n")
    assert [d.text for d in iter_corpus(str(j))] == ["hello", "world"]
    j.write_text('{"txt": "x"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:1: .*'text'"):
        list(iter_corpus(str(j)))


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_roundtrip(built, tmp_path):
    tok = built["tok"]
    assert tok.vocab_size == VOCAB
    assert tok.eod == 0 and tok.id_to_token(0) == EOD_TOKEN
    docs = list(iter_documents(built["b"]))  # text the tokenizer was not trained on
    for d in docs:
        ids = tok.encode(d.text)
        assert max(ids) < tok.vocab_size and tok.eod not in ids
        assert tok.decode(ids) == d.text
    s = "Unicode too: naïve café ≠ 東京 🙂\ttabs\n"
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch([docs[0].text, s]) == [tok.encode(docs[0].text), tok.encode(s)]
    # deterministic training and stable identity for Megatron's cache hash
    t2 = train_tokenizer((d.text for d in iter_documents(built["a"])), VOCAB, tmp_path / "t.json")
    assert t2.sha256 == tok.sha256
    assert json.loads(json.dumps(tok.unique_identifiers))["sha256"] == tok.sha256
    with pytest.raises(FileNotFoundError, match="jtok-data build"):
        load_tokenizer(tmp_path / "none.json")


# ------------------------------------------------------------------------------------- indexed dataset


def test_indexed_contents_equal_encoded_docs(built):
    tok, ra = built["tok"], built["ra"]
    docs = list(iter_documents(built["a"]))
    stored = read_documents(ra.prefix)
    assert len(stored) == len(docs) == ra["documents"]
    for d, arr in zip(docs, stored):
        assert arr.tolist() == tok.encode(d.text) + [tok.eod]
    info = validate_indexed(ra.prefix)
    assert info.dtype == np.uint16 and info.num_tokens == ra["tokens"] == sum(len(x) for x in stored)


def test_build_is_idempotent(built):
    ra = built["ra"]
    again = build_dataset(str(built["a"]), Path(ra.prefix).parent, vocab_size=VOCAB, log=lambda *_: None)
    assert again["skipped"] and again["fingerprint"] == ra["fingerprint"]
    fp_other, _ = fingerprint_inputs(str(built["a"]), vocab_size=VOCAB * 2)
    assert fp_other != ra["fingerprint"]
    # B reused A's tokenizer
    assert built["rb"]["tokenizer_sha256"] == ra["tokenizer_sha256"]


def test_truncated_and_missing_files_give_clear_errors(built, tmp_path):
    src = Path(built["ra"].prefix)
    prefix = tmp_path / "copy"
    shutil.copy(str(src) + ".bin", str(prefix) + ".bin")
    shutil.copy(str(src) + ".idx", str(prefix) + ".idx")
    validate_indexed(prefix)
    size = os.path.getsize(str(prefix) + ".bin")
    with open(str(prefix) + ".bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DataFileError) as e:
        validate_indexed(prefix)
    msg = str(e.value)
    assert "\n" not in msg and "copy.bin" in msg and "truncated" in msg and "jtok-data build" in msg
    # the training path reports the same error before Megatron sees the file
    from jtok_train.data.datasets import build_datasets

    with pytest.raises(DataFileError, match="truncated"):
        build_datasets(str(prefix), built["tok"], seq_length=32, seed=1, train_samples=8, valid_samples=2)
    os.remove(str(prefix) + ".idx")
    with pytest.raises(DataFileError) as e:
        validate_indexed(prefix)
    msg = str(e.value)
    assert "\n" not in msg and "copy.idx" in msg and "missing" in msg and "jtok-data build" in msg
    with pytest.raises(DataFileError, match="token id .* tokenizer has 10 ids"):
        check_token_range(src, vocab_size=10)


def test_stats(built):
    s = dataset_stats(built["ra"].prefix, window=256)
    assert s["documents"] == built["ra"]["documents"] and s["tokens"] == built["ra"]["tokens"]
    assert 0.0 < s["unique_ratio"]["p5"] <= s["unique_ratio"]["mean"] <= s["unique_ratio"]["p95"] <= 1.0
    assert unique_ratio_per_window(np.array([1, 1, 2, 3, 5, 5, 5, 5]), 4).tolist() == [0.75, 0.25]


def test_cli(built, tmp_path, capsys):
    from jtok_train.cli.data import main

    assert main(["build", "--source", str(built["b"]), "--out", str(tmp_path / "cli"), "--vocab-size", "512"]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "tokens" in out and "vocab       512" in out
    assert main(["build", "--source", str(built["b"]), "--out", str(tmp_path / "cli"), "--vocab-size", "512"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["stats", str(tmp_path / "cli")]) == 0
    assert "unique/total ids per 2048-token window" in capsys.readouterr().out
    assert main(["stats", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jtok-data: error:") and "nothing.idx is missing" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "python-docs" in capsys.readouterr().out


# ------------------------------------------------------------------------- Megatron datasets and batches


def test_blend_split_and_determinism(built, tmp_path):
    import torch.distributed as dist
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from jtok_train.data.datasets import build_datasets, get_microbatch

    tok, pa, pb = built["tok"], built["ra"].prefix, built["rb"].prefix
    kw = dict(seq_length=64, seed=1234, train_samples=400, valid_samples=20, split="90,10")
    # 1) with a caller-owned 1-rank gloo group (free port), which build_datasets must leave alone
    from jtok_train.testing.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tr1, va1 = build_datasets([(pa, 0.75), (pb, 0.25)], tok, cache_dir=tmp_path / "c1", **kw)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    # 2) without a group (build_datasets opens a private one), separate cache: a genuine rebuild
    tr2, va2 = build_datasets([(pa, 0.75), (pb, 0.25)], tok, cache_dir=tmp_path / "c2", **kw)
    assert not dist.is_initialized()

    assert isinstance(tr1, BlendedDataset) and len(tr1) >= 400
    assert va1 is not None and len(va1) >= 1  # train/valid split both non-empty
    frac_a = float(np.mean(np.asarray(tr1.dataset_index[:400]) == 0))
    assert abs(frac_a - 0.75) < 0.02, frac_a
    assert np.array_equal(tr1.dataset_index, tr2.dataset_index)
    idx = list(range(0, 400, 37))
    b1, b2 = get_microbatch(tr1, idx), get_microbatch(tr2, idx)
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        assert b1[k].equal(b2[k])
    assert b1["attention_mask"] is None
    assert b1["tokens"].shape == (len(idx), 64) and b1["labels"][:, :-1].equal(b1["tokens"][:, 1:])
    assert int(b1["tokens"].max()) < tok.vocab_size
    # valid reads other (held-out) documents than train
    assert not get_microbatch(va1, [0])["tokens"].equal(get_microbatch(tr1, [0])["tokens"])
    with pytest.raises(IndexError, match="train_samples"):
        get_microbatch(tr1, [len(tr1)])
    # a split that would leave a blend member's valid part empty is refused (Megatron would loop forever)
    n_b = built["rb"]["documents"]
    with pytest.raises(ValueError, match="valid part empty"):
        build_datasets([(pa, 0.5), (pb, 0.5)], tok, seq_length=64, seed=1, train_samples=8, valid_samples=2,
                       split=f"{2 * n_b},1", cache_dir=tmp_path / "c3")


def test_batch_order_independent_of_dp_size(built):
    from jtok_train.data.datasets import (
        build_datasets,
        global_batch_indices,
        make_batch,
        microbatch_indices,
        num_microbatches,
    )

    G, m, steps = 16, 2, 3
    tr, _ = build_datasets(built["ra"].prefix, built["tok"], seq_length=32, seed=7,
                           train_samples=G * steps, valid_samples=4)
    ref = np.concatenate([global_batch_indices(s, G) for s in range(steps)])
    assert ref.tolist() == list(range(G * steps))
    for W in (1, 2, 4):
        n = G // (m * W)
        # the trainer's order: step by step, micro-step by micro-step
        per_rank = [[microbatch_indices(t, k, r, W, m, G).tolist() for t in range(steps)
                     for k in range(num_microbatches(G, m, W))] for r in range(W)]
        assert all(len(p) == n * steps for p in per_rank)
        # order the rank-local micro-batches by (step, micro-step, rank): the global order, for every W
        merged = [i for t in range(n * steps) for r in range(W) for i in per_rank[r][t]]
        assert merged == ref.tolist()
        for r in range(W):
            assert per_rank[r][n + 1] == microbatch_indices(1, 1, r, W, m, G).tolist()
        # the actual token batch of step 1 is the same whatever W
        step1 = [make_batch([tr[i] for i in per_rank[r][t]])["tokens"]
                 for t in range(n, 2 * n) for r in range(W)]
        import torch
        got = torch.cat(step1)
        want = make_batch([tr[int(i)] for i in global_batch_indices(1, G)])["tokens"]
        assert got.equal(want)
    # resume at another world size from the global consumed-sample count
    assert microbatch_indices(0, 0, 1, 2, m, G, G).tolist() == [G + 2, G + 3]
    with pytest.raises(ValueError, match="not a multiple"):
        num_microbatches(G, 3, 2)
