"""Data at pretraining scale: streaming sources, pretrained tokenizers, parallel and resumable tokenization.

The fixtures (parquet shards, JSONL.gz/.zst, a ``datasets.save_to_disk`` directory, a directory of text files)
are made here from the same real documents (paragraphs of the Python docs, else of the standard library), so
every source must give the same token stream. Every expected token list comes from encoding the documents
directly with the tokenizer, never from an earlier build.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jtok_train.data.build import build_dataset
from jtok_train.data.corpus import CorpusError
from jtok_train.data.indexed import read_documents, validate_indexed, write_indexed_dataset
from jtok_train.data.sources import resolve_inputs
from jtok_train.data.tokenizer import load_tokenizer, padded_vocab_size, train_tokenizer
from tests.conftest import _real_text_files

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
QUIET = dict(log=lambda *_: None)


def _paragraphs(n: int) -> list[str]:
    out: list[str] = []
    for f in _real_text_files(40):
        out += [p for p in f.read_text(errors="replace").split("\n\n") if len(p.strip()) > 40]
    assert len(out) >= n, f"only {len(out)} paragraphs of real text"
    return out[:n]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """600 real documents (plus a blank one every source must drop) and a BPE tokenizer trained on them."""
    root = tmp_path_factory.mktemp("sources")
    docs = _paragraphs(600)
    docs.insert(7, "   \n")  # whitespace only: not a document in any source
    docs.append("Unicode: naïve café ≠ 東京 🙂\n")
    tok = train_tokenizer(docs, 512, root / "tok" / "tokenizer.json")
    return {"root": root, "docs": docs, "kept": [d for d in docs if d.strip()], "tok": tok,
            "tok_path": root / "tok" / "tokenizer.json"}


def _write_text_dir(d: Path, docs) -> Path:
    d.mkdir(parents=True)
    for i, t in enumerate(docs):
        (d / f"doc_{i:05d}.txt").write_text(t, encoding="utf-8")
    return d


def _write_parquet(path: Path, docs, field: str = "text", row_group: int = 64) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(docs))), field: list(docs)}), path, row_group_size=row_group)
    return path


def _write_jsonl(path: Path, docs, field: str = "text") -> Path:
    lines = "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(docs))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    elif path.name.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def _files(prefix) -> tuple[bytes, bytes]:
    return Path(str(prefix) + ".bin").read_bytes(), Path(str(prefix) + ".idx").read_bytes()


def _build(src, out, tok_path, **kw):
    return build_dataset(src, out, tokenizer_path=tok_path, max_doc_chars=None, **QUIET, **kw)


# ------------------------------------------------------------------------------------------------ sources


def test_every_source_gives_the_text_path_token_stream(corpus, tmp_path):
    from datasets import Dataset

    docs, tok, tp = corpus["docs"], corpus["tok"], corpus["tok_path"]
    half = len(docs) // 2
    text = _build(str(_write_text_dir(tmp_path / "txt", docs)), tmp_path / "o_txt", tp)
    # the reference stream: each kept document encoded directly, EOD after each
    expected = [tok.encode(t) + [tok.eod] for t in corpus["kept"]]
    assert [a.tolist() for a in read_documents(text.prefix)] == expected
    ref = _files(text.prefix)
    # the chunked writer gives the bytes of Megatron's per-document add_item + end_document path
    write_indexed_dataset(tmp_path / "per_doc", [e[:-1] for e in expected], tok.vocab_size, tok.eod)
    assert _files(tmp_path / "per_doc") == ref

    _write_parquet(tmp_path / "pq" / "shard_0.parquet", docs[:half])
    _write_parquet(tmp_path / "pq" / "shard_1.parquet", docs[half:], row_group=50)
    gz = _write_jsonl(tmp_path / "all.jsonl.gz", docs)
    zst = _write_jsonl(tmp_path / "all.jsonl.zst", docs)
    hf = tmp_path / "hf"
    Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(str(hf), num_shards=3)
    assert len(resolve_inputs([str(hf)])) == 3  # really several arrow files
    first_half = _write_jsonl(tmp_path / "first.jsonl.gz", docs[:half])
    cases = {
        "parquet dir": [str(tmp_path / "pq")],
        "parquet glob": [str(tmp_path / "pq" / "*.parquet")],
        "jsonl.gz": [str(gz)],
        "jsonl.zst": [str(zst)],
        "save_to_disk": [str(hf)],
        "two sources": [str(first_half), str(tmp_path / "pq" / "shard_1.parquet")],
    }
    for name, src in cases.items():
        r = _build(src, tmp_path / f"o_{len(name)}_{name.replace(' ', '_')}", tp)
        assert r["documents"] == len(corpus["kept"]), name
        assert _files(r.prefix) == ref, f"{name}: token stream differs from the text path"


def test_bad_inputs_name_the_file_and_the_fix(corpus, tmp_path):
    tp = str(corpus["tok_path"])
    bad_field = _write_parquet(tmp_path / "content.parquet", corpus["kept"][:20], field="content")
    with pytest.raises(CorpusError) as e:
        _build(str(bad_field), tmp_path / "o1", tp)
    msg = str(e.value)
    assert "\n" not in msg and str(bad_field) in msg and "--text-field" in msg and "'content'" in msg
    r = _build(str(bad_field), tmp_path / "o1", tp, text_field="content")
    assert r["documents"] == 20
    jl = _write_jsonl(tmp_path / "body.jsonl", corpus["kept"][:5], field="body")
    with pytest.raises(CorpusError, match=r"body\.jsonl has no text field 'text' .*--text-field"):
        _build(str(jl), tmp_path / "o2", tp)
    with pytest.raises(CorpusError, match=r"DatasetDict .*--source .*train"):
        from datasets import Dataset, DatasetDict

        DatasetDict({"train": Dataset.from_dict({"text": ["a b"]})}).save_to_disk(str(tmp_path / "dd"))
        _build(str(tmp_path / "dd"), tmp_path / "o3", tp)


def test_cli_errors_are_one_line(corpus, tmp_path, capsys):
    from jtok_train.cli.data import main

    tp = str(corpus["tok_path"])
    bad = tmp_path / "broken" / "shard_1.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 this is not a parquet file")
    _write_parquet(tmp_path / "broken" / "shard_0.parquet", corpus["kept"][:30])
    capsys.readouterr()
    assert main(["build", "--source", str(tmp_path / "broken"), "--tokenizer", tp, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "unreadable" in err and "rerun the same command" in err
    # what was read before the bad shard is kept as a finished part
    parts = sorted((tmp_path / "o" / "parts").glob("part_*.json"))
    assert len(parts) == 1 and json.loads(parts[0].read_text())["docs"] == 30
    assert main(["build", "--source", str(tmp_path / "broken" / "shard_0.parquet"), "--tokenizer", tp,
                 "--out", str(tmp_path / "o4"), "--model-vocab-size", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and tp in err and "512 ids" in err and "model.vocab_size=512" in err


# -------------------------------------------------------------------------------------------- tokenizers


def _big_wordlevel(path: Path, n_words: int = 70_000, eos: str = "</s>") -> list[str]:
    """A Hugging Face tokenizer.json with more ids than uint16 holds (like Qwen2's 151,665)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(n_words)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["[UNK]"] = n_words
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens([eos, "<|im_start|>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    t.save(str(path))
    return words


def test_pretrained_tokenizer_eod_and_vocab(tmp_path):
    tp = tmp_path / "hf_tok" / "tokenizer.json"
    words = _big_wordlevel(tp)
    tok = load_tokenizer(tp)
    assert tok.eod_token == "</s>" and tok.eod == 70_001 and tok.vocab_size == 70_003
    # tokenizer_config.json's eos_token wins (the Hugging Face layout), an explicit token wins over both
    (tp.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_start|>"}}))
    assert load_tokenizer(tp.parent).eod == 70_002
    assert load_tokenizer(tp, eod_token="</s>").eod == 70_001
    with pytest.raises(ValueError, match=r"no token '<nope>'.*--eod-token"):
        load_tokenizer(tp, eod_token="<nope>")
    rng = np.random.default_rng(0)
    docs = [" ".join(words[j] for j in rng.integers(0, len(words), 50)) for _ in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = build_dataset(str(tmp_path / "c.jsonl"), tmp_path / "out", tokenizer_path=tp.parent, **QUIET)
    assert r["dtype"] == "int32" and r["eod"] == 70_002 and r["padded_vocab_size"] == 70_016
    got = read_documents(r.prefix)
    assert [a.tolist() for a in got] == [[int(w[1:]) for w in d.split()] + [70_002] for d in docs]
    # the copy in the output directory loads with the same end-of-document id (training reads that one)
    assert load_tokenizer(tmp_path / "out" / "tokenizer.json").eod == 70_002
    # no end-of-document token at all: one line naming the file and the option
    bare = tmp_path / "bare" / "tokenizer.json"
    _big_wordlevel(bare, 10, eos="<sep>")
    with pytest.raises(ValueError, match=r"bare.tokenizer\.json has no end-of-document token .*--eod-token"):
        load_tokenizer(bare)
    # Megatron's padding: to a multiple of 128 x TP
    assert padded_vocab_size(151_665) == 151_680 and padded_vocab_size(151_665, 128, 8) == 152_576
    assert padded_vocab_size(4096) == 4096


def test_model_vocab_smaller_than_tokenizer_is_a_config_error():
    from jtok_train.config import ConfigError, compose, validate

    cfg = compose(["model=tiny", "parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, tokenizer_vocab=151_665)
    msg = str(e.value)
    assert "\n" not in msg and "model.vocab_size=4096" in msg and "model.vocab_size=151808" in msg
    assert "data.tokenizer=" in msg


def test_model_vocab_null_is_the_tokenizers_padded_like_megatron(tmp_path):
    from jtok_train.config import ConfigError, compose, validate

    tp = tmp_path / "hf_tok" / "tokenizer.json"
    _big_wordlevel(tp)                                                    # 70,003 ids
    cfg = compose(["model=tiny", "model.vocab_size=null", f"data.tokenizer={tp}"])
    assert cfg.model.vocab_size == 70_016                                 # 547 x 128
    validate(cfg, tokenizer_vocab=70_003)
    cfg2 = compose(["model=tiny", "model.vocab_size=null", f"data.tokenizer={tp}",
                    "parallel.tensor_model_parallel_size=2"])
    assert cfg2.model.vocab_size == 70_144                                # 274 x 256: divisible by 128 x TP
    assert compose(["model=tiny", f"data.tokenizer={tp}"]).model.vocab_size == 4096     # a set value stays
    with pytest.raises(ConfigError, match=r"model.vocab_size=null .* data.tokenizer=\S*nope.json is not a file: "
                                          r"build the data first"):
        compose(["model=tiny", "model.vocab_size=null", f"data.tokenizer={tmp_path / 'nope.json'}"])


# ------------------------------------------------------------------------------- workers and resumption


def test_one_and_four_workers_write_identical_files(corpus, tmp_path):
    tp = corpus["tok_path"]
    src = str(_write_parquet(tmp_path / "c.parquet", corpus["docs"]))
    one = _build(src, tmp_path / "w1", tp, workers=1, chunk_docs=16, part_tokens=5000)
    four = _build(src, tmp_path / "w4", tp, workers=4, chunk_docs=16, part_tokens=5000)
    assert _files(one.prefix) == _files(four.prefix)
    assert len(json.loads((tmp_path / "w4" / "manifest.json").read_text())["prefixes"]) == 1
    expected = [corpus["tok"].encode(t) + [corpus["tok"].eod] for t in corpus["kept"]]
    assert [a.tolist() for a in read_documents(four.prefix)] == expected
    # the parts (>= 5,000 tokens each: many) merged into the bytes of Megatron's per-document builder
    assert one["tokens"] > 10 * 5000
    write_indexed_dataset(tmp_path / "per_doc", [e[:-1] for e in expected], corpus["tok"].vocab_size,
                          corpus["tok"].eod)
    assert _files(tmp_path / "per_doc") == _files(one.prefix)
    # sharded output: same shards, same bytes
    s1 = _build(src, tmp_path / "s1", tp, workers=1, chunk_docs=16, shard_tokens=20_000)
    s4 = _build(src, tmp_path / "s4", tp, workers=4, chunk_docs=16, shard_tokens=20_000)
    assert len(s1.prefixes) == len(s4.prefixes) >= 3
    from jtok_train.cli.data import main

    assert main(["stats", str(tmp_path / "s4")]) == 2  # a directory of shards: asks for one of them
    assert main(["stats", s4.prefixes[1]]) == 0
    for a, b in zip(s1.prefixes, s4.prefixes):
        assert Path(a).name == Path(b).name and _files(a) == _files(b)
    # every shard but the last holds at least shard_tokens tokens; together they are the one-file stream
    infos = [validate_indexed(p) for p in s4.prefixes]
    assert all(i.num_tokens >= 20_000 for i in infos[:-1])
    joined = [a.tolist() for p in s4.prefixes for a in read_documents(p)]
    assert joined == expected


def test_progress_bar_shows_documents_and_tokens_per_second(corpus, tmp_path, capsys):
    src = str(_write_parquet(tmp_path / "c.parquet", corpus["docs"]))
    _build(src, tmp_path / "o", corpus["tok_path"], progress=True, chunk_docs=64)
    err = capsys.readouterr().err
    # tqdm's rate (documents) and our postfix (tokens); total = the parquet row count, blank row included
    assert "doc/s" in err and "tokens/s" in err and f"/{len(corpus['docs'])}" in err, err[-500:]


def test_bad_shard_keeps_parts_and_resumes_to_the_same_output(corpus, tmp_path):
    tp = corpus["tok_path"]
    kept = corpus["kept"]
    d = tmp_path / "shards"
    for i in range(4):
        _write_parquet(d / f"s{i}.parquet", kept[i * 150:(i + 1) * 150])
    ref = _build(str(d), tmp_path / "ref", tp, chunk_docs=32, part_tokens=8000)
    good = (d / "s2.parquet").read_bytes()
    (d / "s2.parquet").write_bytes(good[: len(good) // 2])  # a truncated download
    with pytest.raises(CorpusError, match=r"s2\.parquet is unreadable"):
        _build(str(d), tmp_path / "o", tp, chunk_docs=32, part_tokens=8000)
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "o" / "parts").glob("part_*.json"))]
    assert sum(r["docs"] for r in recs) == 300  # s0 and s1, nothing lost
    (d / "s2.parquet").write_bytes(good)
    again = _build(str(d), tmp_path / "o", tp, chunk_docs=32, part_tokens=8000)
    assert again["resumed_parts"] == len(recs) and _files(again.prefix) == _files(ref.prefix)


def test_sharded_build_resumes_after_a_bad_shard(corpus, tmp_path):
    tp = corpus["tok_path"]
    kept = corpus["kept"]
    d = tmp_path / "shards"
    for i in range(4):
        _write_parquet(d / f"s{i}.parquet", kept[i * 150:(i + 1) * 150])
    kw = dict(chunk_docs=16, shard_tokens=6000)
    ref = _build(str(d), tmp_path / "ref", tp, **kw)
    good = (d / "s3.parquet").read_bytes()
    (d / "s3.parquet").write_bytes(good[:100])
    with pytest.raises(CorpusError, match=r"s3\.parquet is unreadable"):
        _build(str(d), tmp_path / "o", tp, **kw)
    done = sorted((tmp_path / "o").glob("text_document_*.bin"))
    assert 2 <= len(done) < len(ref.prefixes)  # the finished shards stay; the unfinished one is not written
    (d / "s3.parquet").write_bytes(good)
    again = _build(str(d), tmp_path / "o", tp, **kw)
    assert again["resumed_parts"] == len(done) and [Path(p).name for p in again.prefixes] == \
        [Path(p).name for p in ref.prefixes]
    for a, b in zip(again.prefixes, ref.prefixes):
        assert _files(a) == _files(b)
    assert not (tmp_path / "o" / "parts").exists() and not (tmp_path / "o" / "text_document.bin").exists()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "jtok_train.cli.data", "build", *map(str, args)]


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_output(corpus, tmp_path):
    """SIGKILL a real build after its first finished part and before its manifest; rerun; compare bytes."""
    tp = corpus["tok_path"]
    kept = corpus["kept"]
    d = tmp_path / "shards"
    # ~0.6M tokens in 4 shards, ~60 parts of 10k tokens: the kill after the 2nd part leaves most of the build
    for i in range(4):
        _write_parquet(d / f"s{i}.parquet", kept * 2, row_group=128)
    args = ("--source", d, "--tokenizer", tp, "--max-doc-chars", "0", "--chunk-docs", "16",
            "--part-tokens", "10000", "--no-progress")
    ref = _build(str(d), tmp_path / "ref", tp, chunk_docs=16, part_tokens=10_000)  # uninterrupted, in-process
    out = tmp_path / "o"
    proc = subprocess.Popen(_cli(*args, "--out", out), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "parts" / "part_00001.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # it really was mid-build: parts finished, no output, no manifest
    n_parts = len(list((out / "parts").glob("part_*.json")))
    assert n_parts >= 2 and not (out / "manifest.json").exists() and not (out / "text_document.bin").exists()
    rerun = subprocess.run(_cli(*args, "--out", out, "--json"), env=ENV, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    m = json.loads(rerun.stdout)
    assert m["resumed_parts"] >= n_parts  # the finished parts were kept, not redone
    assert _files(out / "text_document") == _files(ref.prefix)
    assert not (out / "parts").exists()


# ------------------------------------------------------------------------------------------------ memory


_PEAK = """
import resource, sys, threading, time
import psutil
import pyarrow.parquet, tokenizers  # noqa: F401  the imports first: their memory is the baseline
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401
from jtok_train.cli.data import main
proc, peak, done = psutil.Process(), [0], threading.Event()
base = proc.memory_info().rss
def sample():  # the build's own peak: ru_maxrss alone can be set by an import-time transient
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
t = threading.Thread(target=sample, daemon=True)
t.start()
rc = main(sys.argv[1:])
done.set(); t.join()
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "BASE", base, "SAMPLED", peak[0])
sys.exit(rc)
"""


@pytest.mark.slow
def test_peak_memory_is_flat_in_corpus_size(corpus, tmp_path):
    tp = corpus["tok_path"]
    rng = np.random.default_rng(1)
    words = np.array(" ".join(corpus["kept"]).split())

    def make(d: Path, shards: int) -> int:
        """Parquet shards of 1,000 documents (~1.4 MB of text each), row groups of 500 rows like real dumps."""
        chars = 0
        for s in range(shards):
            docs = [" ".join(words[rng.integers(0, len(words), 200)]) for _ in range(1000)]
            chars += sum(len(x) for x in docs)
            _write_parquet(d / f"s{s:03d}.parquet", docs, row_group=500)
        return chars

    small_chars, large_chars = make(tmp_path / "small", 2), make(tmp_path / "large", 20)
    peaks, sampled_peaks = {}, {}
    for name in ("small", "large"):
        p = subprocess.run([sys.executable, "-c", _PEAK, "build", "--source", tmp_path / name, "--tokenizer", tp,
                            "--out", tmp_path / f"o_{name}", "--no-progress"], env=ENV, cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        maxrss_kb, _, base, _, sampled = p.stdout.split("PEAK_KB")[1].split()
        peaks[name] = int(maxrss_kb) * 1024
        sampled_peaks[name] = int(sampled)
    print("peak RSS (bytes):", peaks, "sampled:", sampled_peaks, "text characters:", small_chars, large_chars)
    m = json.loads((tmp_path / "o_large" / "manifest.json").read_text())
    assert m["documents"] == 20_000 and m["characters"] == large_chars
    # The bound: 10x the corpus, at most 1.5x the peak; on ru_maxrss and on the RSS sampled every 20 ms
    # during the build (Linux carries the high-water mark of the forking parent, here pytest, into the child's
    # ru_maxrss, which can hide the build's own peak; the sampled one is the build's).
    assert peaks["large"] <= 1.5 * peaks["small"], peaks
    assert sampled_peaks["large"] <= 1.5 * sampled_peaks["small"], sampled_peaks
    # Sharper, since most of the peak is the interpreter, torch and megatron: the extra peak is under a quarter of
    # the extra text (a reader holding the corpus would add at least all of it, as str; the quarter leaves room for
    # allocator noise and the part's index in Megatron's builder, ~70 bytes a document as Python lists;
    # measured here: about an eighth).
    assert sampled_peaks["large"] - sampled_peaks["small"] <= 0.25 * (large_chars - small_chars), sampled_peaks


# ------------------------------------------------------------------------------------------------- blends


@pytest.mark.e2e
def test_blend_example_config_trains(corpus, tmp_path):
    """jtok_train/configs/data/blend_example.yaml as shipped (its root moved with JTOK_DATA) trains the tiny model."""
    from tests.conftest import tiny_overrides

    root = tmp_path / "data"
    kept = corpus["kept"]
    demo = build_dataset(str(_write_text_dir(tmp_path / "txt", kept[:400])), root / "demo", vocab_size=512, **QUIET)
    web = _build(str(_write_parquet(tmp_path / "web.parquet", kept[400:])), root / "web",
                 root / "demo" / "tokenizer.json")
    assert web["tokenizer_sha256"] == demo["tokenizer_sha256"]
    run = tmp_path / "run"
    args = [o for o in tiny_overrides({"prefix": "", "tokenizer": ""}, str(run), dense=True, jtok="jtok")
            if not o.startswith("data.")] + ["data=blend_example"]
    proc = subprocess.run([sys.executable, "-m", "jtok_train", *args], capture_output=True, text=True, timeout=600,
                          env=dict(ENV, JTOK_DATA=str(root)), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = (run / ".hydra" / "config.yaml").read_text()
    assert "blend_example" in (run / ".hydra" / "overrides.yaml").read_text() and "weights:" in cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_blend_command_expands_shards_by_tokens(corpus, tmp_path, capsys):
    from jtok_train.cli.data import main

    tp = corpus["tok_path"]
    src = str(_write_parquet(tmp_path / "c.parquet", corpus["kept"]))
    sh = _build(src, tmp_path / "sh", tp, shard_tokens=20_000)
    one = _build(src, tmp_path / "one", tp)
    assert main(["blend", f"{tmp_path / 'sh'}:0.25", f"{tmp_path / 'one'}:0.75"]) == 0
    import yaml  # omegaconf's dependency

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["prefixes"] == sh.prefixes + one.prefixes
    tokens = [validate_indexed(p).num_tokens for p in sh.prefixes]
    assert cfg["weights"][:-1] == pytest.approx([0.25 * t / sum(tokens) for t in tokens], rel=1e-5)  # %.6g
    assert cfg["weights"][-1] == 0.75 and cfg["tokenizer"].endswith("tokenizer.json")
    other = build_dataset(src, tmp_path / "other", vocab_size=300, **QUIET)
    assert other["vocab_size"] != 512
    assert main(["blend", f"{tmp_path / 'sh'}:1", f"{tmp_path / 'other'}:1"]) == 2
    assert "another tokenizer" in capsys.readouterr().err
