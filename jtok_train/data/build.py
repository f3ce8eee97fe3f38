"""corpus -> tokenizer -> Megatron indexed dataset, with an idempotent manifest; and dataset statistics.

Output directory layout (``--out DIR``)::

    DIR/tokenizer.json        byte-level BPE (HF tokenizers), <|endoftext|> = EOD
    DIR/text_document.bin     token ids, one document per entry, EOD appended   (prefix: DIR/text_document)
    DIR/text_document.idx
    DIR/manifest.json         fingerprint + settings + stats, written last
    DIR/cache/                Megatron's index cache, filled by build_datasets()

The fingerprint is the sha256 of the settings (source, pattern, vocab size, ...), the list of input files with
their sizes, and the sha256 of a given --tokenizer. A build whose fingerprint matches the manifest, and whose
outputs still validate, is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from jtok_train.data.corpus import (
    DEFAULT_MAX_DOC_CHARS,
    PYTHON_DOCS_PATTERN,
    CorpusError,
    Document,
    corpus_files,
    iter_corpus,
    resolve_source,
)
from jtok_train.data.indexed import DataFileError, validate_indexed, write_indexed_dataset
from jtok_train.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["PREFIX_NAME", "MANIFEST_NAME", "BuildResult", "fingerprint_inputs", "build_dataset",
           "dataset_stats", "unique_ratio_per_window"]

PREFIX_NAME = "text_document"
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class BuildResult(dict):
    """The manifest dict, plus ``skipped`` (True when the outputs were already up to date)."""

    @property
    def prefix(self) -> str:
        return self["prefix_path"]


def fingerprint_inputs(
    source: str,
    vocab_size: int,
    pattern: Optional[str] = None,
    max_doc_chars: Optional[int] = DEFAULT_MAX_DOC_CHARS,
    min_frequency: int = 2,
    tokenizer_path: Optional[PathLike] = None,
) -> Tuple[str, Dict[str, Any]]:
    """(sha256 hex, settings dict) of everything that determines the build's outputs."""
    kind, path = resolve_source(source)
    if kind == "python-docs":
        pattern = pattern or PYTHON_DOCS_PATTERN
    if kind == "jsonl":
        files = [[path.name, path.stat().st_size]]
    else:
        files = [[p.relative_to(path).as_posix(), p.stat().st_size] for p in corpus_files(path, pattern)]
    settings: Dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": source if kind == "python-docs" else str(path),
        "source_kind": kind,
        "source_path": str(path),
        "pattern": pattern,
        "max_doc_chars": max_doc_chars,
        "vocab_size": None if tokenizer_path else vocab_size,
        "min_frequency": None if tokenizer_path else min_frequency,
        "tokenizer_sha256": (hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
                             if tokenizer_path else None),
        "num_files": len(files),
        "total_bytes": int(sum(s for _, s in files)),
    }
    h = hashlib.sha256(json.dumps({"settings": settings, "files": files}, sort_keys=True).encode())
    return h.hexdigest(), settings


def _up_to_date(out: Path, fp: str) -> Optional[Dict[str, Any]]:
    mpath = out / MANIFEST_NAME
    if not mpath.is_file():
        return None
    try:
        m = json.loads(mpath.read_text())
    except ValueError:
        return None
    if m.get("fingerprint") != fp:
        return None
    try:
        info = validate_indexed(out / PREFIX_NAME)
        tok = out / TOKENIZER_NAME
        if not tok.is_file() or hashlib.sha256(tok.read_bytes()).hexdigest() != m.get("tokenizer_sha256"):
            return None
    except DataFileError:
        return None
    if info.num_tokens != m.get("tokens") or info.num_documents != m.get("documents"):
        return None
    return m


def _encoded(tok: Tokenizer, docs: Iterator[Document], batch: int = 256) -> Iterator[List[int]]:
    buf: List[str] = []
    for d in docs:
        buf.append(d.text)
        if len(buf) == batch:
            yield from tok.encode_batch(buf)
            buf = []
    if buf:
        yield from tok.encode_batch(buf)


def build_dataset(
    source: str,
    out: PathLike,
    vocab_size: int = 4096,
    pattern: Optional[str] = None,
    max_doc_chars: Optional[int] = DEFAULT_MAX_DOC_CHARS,
    min_frequency: int = 2,
    tokenizer_path: Optional[PathLike] = None,
    force: bool = False,
    log=print,
) -> BuildResult:
    """Build ``out/`` from ``source`` ("python-docs", a directory, or a .jsonl file); see module doc.

    With ``tokenizer_path`` the given tokenizer is copied to ``out/tokenizer.json`` and used instead of
    training one (needed to blend several datasets: they must share one tokenizer).
    Returns the manifest (a :class:`BuildResult`) with ``skipped`` set.
    """
    out = Path(out)
    fp, settings = fingerprint_inputs(source, vocab_size, pattern, max_doc_chars, min_frequency, tokenizer_path)
    if not force:
        m = _up_to_date(out, fp)
        if m is not None:
            log(f"{out}: up to date (fingerprint {fp[:12]}), nothing to do; --force rebuilds")
            r = BuildResult(m)
            r["skipped"] = True
            r["prefix_path"] = str(out / PREFIX_NAME)
            return r

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    pattern = settings["pattern"]

    def docs() -> Iterator[Document]:
        return iter_corpus(source, pattern, max_doc_chars)

    n_docs, n_chars = 0, 0
    for d in docs():
        n_docs += 1
        n_chars += len(d.text)
    if n_docs == 0:
        raise CorpusError(f"--source {source}: the corpus has no non-empty documents")
    t_read = time.perf_counter()

    tok_path = out / TOKENIZER_NAME
    if tokenizer_path is not None:
        src_tok = Path(tokenizer_path)
        data = (src_tok / TOKENIZER_NAME if src_tok.is_dir() else src_tok).read_bytes()
        tmp = tok_path.with_name(TOKENIZER_NAME + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, tok_path)
        tok = load_tokenizer(tok_path)
        log(f"tokenizer: {tokenizer_path} ({tok.vocab_size} ids)")
    else:
        log(f"training byte-level BPE, vocab {vocab_size}, on {n_docs} documents ({n_chars / 1e6:.1f} M chars)")
        tok = train_tokenizer((d.text for d in docs()), vocab_size, tok_path, min_frequency, length=n_docs)
    t_tok = time.perf_counter()

    log(f"encoding and writing {out / PREFIX_NAME}.bin/.idx")
    max_id = [0]

    def tracked() -> Iterator[List[int]]:
        for ids in _encoded(tok, docs()):
            if ids:
                max_id[0] = max(max_id[0], max(ids))
            yield ids

    info = write_indexed_dataset(out / PREFIX_NAME, tracked(), tok.vocab_size, tok.eod)
    t_end = time.perf_counter()

    manifest: Dict[str, Any] = {
        "fingerprint": fp,
        "settings": settings,
        "prefix": PREFIX_NAME,
        "tokenizer": TOKENIZER_NAME,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eod": tok.eod,
        "documents": info.num_documents,
        "tokens": info.num_tokens,
        "characters": n_chars,
        "max_token_id": int(max(max_id[0], tok.eod)),
        "dtype": np.dtype(info.dtype).name,
        "bin_bytes": info.bin_bytes,
        "seconds": {"read": round(t_read - t0, 3), "tokenizer": round(t_tok - t_read, 3),
                    "encode_write": round(t_end - t_tok, 3), "total": round(t_end - t0, 3)},
    }
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    r = BuildResult(manifest)
    r["skipped"] = False
    r["prefix_path"] = str(out / PREFIX_NAME)
    return r


def unique_ratio_per_window(tokens: np.ndarray, window: int) -> np.ndarray:
    """unique/total token ids of each complete, non-overlapping ``window``-token slice of ``tokens``."""
    n = len(tokens) // window
    if n == 0:
        return np.zeros(0)
    w = np.sort(np.asarray(tokens[: n * window]).reshape(n, window), axis=1)
    uniq = (np.diff(w, axis=1) != 0).sum(axis=1) + 1
    return uniq / window


def dataset_stats(prefix: PathLike, window: int = 2048) -> Dict[str, Any]:
    """Documents, tokens and the unique/total id ratio per ``window`` tokens of the concatenated stream."""
    info = validate_indexed(prefix)
    toks = np.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r") if info.num_tokens else np.zeros(0)
    r = unique_ratio_per_window(toks, window)
    lengths = None
    with open(info.prefix + ".idx", "rb") as f:
        f.seek(34)
        lengths = np.frombuffer(f.read(info.num_sequences * 4), dtype=np.int32)
    stats: Dict[str, Any] = {
        "prefix": info.prefix,
        "documents": info.num_documents,
        "tokens": info.num_tokens,
        "dtype": np.dtype(info.dtype).name,
        "tokens_per_document": {
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "median": float(np.median(lengths)) if len(lengths) else 0.0,
            "max": int(lengths.max()) if len(lengths) else 0,
        },
        "distinct_ids": int(len(np.unique(np.asarray(toks)))) if info.num_tokens else 0,
        "window": window,
        "windows": int(len(r)),
    }
    if len(r):
        stats["unique_ratio"] = {
            "mean": float(r.mean()),
            "p5": float(np.percentile(r, 5)),
            "p50": float(np.percentile(r, 50)),
            "p95": float(np.percentile(r, 95)),
        }
    return stats
