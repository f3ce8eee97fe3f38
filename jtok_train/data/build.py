"""corpus -> tokenizer -> Megatron indexed dataset: streaming, in N worker processes, resumable; and statistics.

Output directory layout (``--out DIR``)::

    DIR/tokenizer.json            the tokenizer (trained byte-level BPE, or a copy of the given one)
    DIR/tokenizer_config.json     {"eos_token": ...}: the end-of-document token, for a given tokenizer
    DIR/text_document.bin/.idx    token ids, one document per entry, EOD appended     (prefix: DIR/text_document)
      or DIR/text_document_00000.bin/.idx, _00001, ...  with --shard-tokens N           (one prefix per shard)
    DIR/text_document.counts.npy  how often each token id occurs (per output prefix; parallel.hot_rows)
    DIR/manifest.json             fingerprint + settings + stats, written last
    DIR/parts/                    while building: finished parts (resume points); removed at the end
    DIR/cache/                    Megatron's index cache, filled by build_datasets()

The fingerprint is the sha256 of the settings (sources, text field, vocab size or tokenizer sha256, ...) and of
the list of input files with their sizes. A build whose fingerprint matches the manifest, and whose outputs still
validate, is skipped.

How a build runs. The main process reads the documents in stream order (:mod:`jtok_train.data.sources`) and cuts
them into chunks of ``chunk_docs`` documents; ``workers`` processes tokenize chunks (at most 2 per worker in
flight, so memory does not grow with the corpus); the main process writes the results in chunk order with
Megatron's ``IndexedDatasetBuilder`` into **parts**. A part ends at the first chunk boundary where it holds
``part_tokens`` tokens (``shard_tokens`` with shards: then the parts are the output shards), is written under a
temporary name, renamed, and recorded by a small JSON file (its end position in the stream, counts, and digests of
the settings and of the input files it read). Chunk and part boundaries depend only on the data and the settings,
never on ``workers``, so the output is byte-identical for any number of workers. An interrupted build (killed,
a bad input file) keeps its finished parts: the same command resumes after the last one whose settings and input
files still match, and produces the same bytes as an uninterrupted build. Without shards, the parts are
concatenated into one .bin/.idx at the end (``IndexedDatasetBuilder.add_index``).

Longer than 400 lines: the build's stages (parts written by N workers, their streaming merge, resume,
statistics) share one manifest format and its checks; split it when a stage grows on its own.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from jtok_train.data.counts import COUNTS_SUFFIX, counts_path, write_token_counts
from jtok_train.data.corpus import DEFAULT_MAX_DOC_CHARS, CorpusError
from jtok_train.data.indexed import DataFileError, index_header, read_index, token_dtype, validate_indexed
from jtok_train.data.sources import (
    InputFile,
    count_records,
    inputs_digest,
    iter_stream,
    prefix_digests,
    resolve_inputs,
)
from jtok_train.data.tokenizer import CONFIG_NAME, Tokenizer, load_tokenizer, padded_vocab_size, train_tokenizer

__all__ = ["PREFIX_NAME", "MANIFEST_NAME", "BuildResult", "fingerprint_inputs", "build_dataset",
           "dataset_stats", "unique_ratio_per_window", "blend_config", "DEFAULT_CHUNK_DOCS", "DEFAULT_PART_TOKENS"]

PREFIX_NAME = "text_document"
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
PARTS_DIR = "parts"
TRAIN_STAMP = "tokenizer.trained.json"
FORMAT_VERSION = 2
DEFAULT_CHUNK_DOCS = 256
DEFAULT_PART_TOKENS = 32 * 1024 * 1024

PathLike = Union[str, os.PathLike]
Sources = Union[str, Sequence[str]]


class BuildResult(dict):
    """The manifest dict, plus ``skipped`` (True when the outputs were already up to date)."""

    @property
    def prefix(self) -> str:
        """The prefix of the dataset (the first shard's with --shard-tokens)."""
        return self["prefix_path"]

    @property
    def prefixes(self) -> List[str]:
        """Every output prefix (one, or one per shard)."""
        return self["prefix_paths"]


def _source_list(source: Sources) -> List[str]:
    return [source] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _tokenizer_file(tokenizer_path: PathLike) -> Path:
    p = Path(tokenizer_path)
    return p / TOKENIZER_NAME if p.is_dir() else p


def fingerprint_inputs(
    source: Sources,
    vocab_size: int,
    pattern: Optional[str] = None,
    max_doc_chars: Optional[int] = DEFAULT_MAX_DOC_CHARS,
    min_frequency: int = 2,
    tokenizer_path: Optional[PathLike] = None,
    text_field: str = "text",
    eod_token: Optional[str] = None,
    shard_tokens: int = 0,
    chunk_docs: int = DEFAULT_CHUNK_DOCS,
    files: Optional[Sequence[InputFile]] = None,
) -> Tuple[str, Dict[str, Any]]:
    """(sha256 hex, settings dict) of everything that determines the build's outputs."""
    if files is None:
        files = resolve_inputs(_source_list(source), pattern)
    tok_file = _tokenizer_file(tokenizer_path) if tokenizer_path else None
    if tok_file is not None and not tok_file.is_file():
        raise FileNotFoundError(f"tokenizer file {tok_file} not found; pass --tokenizer a tokenizer.json (or the "
                                "directory of a Hugging Face tokenizer)")
    settings: Dict[str, Any] = {
        "format": FORMAT_VERSION,
        "sources": _source_list(source),
        "pattern": pattern,
        "max_doc_chars": max_doc_chars,
        "text_field": text_field,
        "vocab_size": None if tok_file else vocab_size,
        "min_frequency": None if tok_file else min_frequency,
        "tokenizer_sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file else None,
        "eod_token": eod_token,
        "shard_tokens": shard_tokens or 0,
        # chunk boundaries are shard boundaries only with shards; one output file does not depend on them
        "chunk_docs": chunk_docs if shard_tokens else None,
        "num_files": len(files),
        "total_bytes": int(sum(f.size for f in files)),
    }
    return _sha({"settings": settings, "files": inputs_digest(files)}), settings


def _output_prefixes(m: Dict[str, Any]) -> List[str]:
    return list(m.get("prefixes") or [m.get("prefix", PREFIX_NAME)])


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
        infos = [validate_indexed(out / p) for p in _output_prefixes(m)]
        tok = out / TOKENIZER_NAME
        if not tok.is_file() or hashlib.sha256(tok.read_bytes()).hexdigest() != m.get("tokenizer_sha256"):
            return None
    except DataFileError:
        return None
    if (sum(i.num_tokens for i in infos) != m.get("tokens")
            or sum(i.num_documents for i in infos) != m.get("documents")):
        return None
    for p in _output_prefixes(m):   # a build made before the counts existed gets them
        if not counts_path(str(out / p)).is_file():
            write_token_counts(str(out / p))
    return m


# ------------------------------------------------------------------------------------------ tokenization

_WORKER: Dict[str, Any] = {}


def _init_worker(tok_path: str, eod_token: Optional[str]) -> None:
    """Worker process initializer: load the tokenizer once (single-threaded: the parallelism is the workers)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tok_path, eod_token)
    _WORKER["tok"] = tok
    _WORKER["dtype"] = token_dtype(tok.vocab_size)


def _encode_chunk(texts: Sequence[str], tok: Optional[Tokenizer] = None, dtype=None):
    """(flat token array with EOD after each document, per-document lengths, max id, characters) of ``texts``."""
    if tok is None:
        tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    hf, eod = tok.hf, tok.eod
    encoded = [hf.encode(t, add_special_tokens=False).ids for t in texts]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    o = 0
    max_id = eod
    for ids in encoded:
        n = len(ids)
        if n:
            flat[o:o + n] = ids
            max_id = max(max_id, max(ids))
        flat[o + n] = eod
        o += n + 1
    return flat, lengths, int(max_id), int(sum(len(t) for t in texts))


def _warm(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _start_workers(tok: Tokenizer, tok_path: Path, workers: int) -> Any:
    """The executor: in-process for 1 worker, else ``workers`` spawned processes, started and ready (a spawn
    pool starts a process per submit that finds none idle: N overlapping warm-up tasks start all N)."""
    if workers == 1:
        return _InProcess(tok)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(str(tok_path), None))
    for f in [pool.submit(_warm, 0.05) for _ in range(workers)]:
        f.result()
    return pool


class _Done:
    """A finished future (module level: a class made per call would keep its result until a full gc)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _InProcess:
    """The executor interface for ``workers=1``: encode in this process (same code, same bytes)."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.dtype = tok, token_dtype(tok.vocab_size)

    def submit(self, fn, texts):
        return _Done(fn(texts, self.tok, self.dtype))

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


def _chunks(docs: Iterator, chunk_docs: int) -> Iterator[Tuple[List[str], Tuple[int, int]]]:
    """(texts, end position) of consecutive chunks; end position = where the stream resumes after the chunk."""
    buf: List[str] = []
    end = (0, 0)
    try:
        for d in docs:
            buf.append(d.text)
            end = (d.file, d.record + 1)
            if len(buf) == chunk_docs:
                yield buf, end
                buf = []
    except CorpusError:
        if buf:  # what was read before a bad input file: the caller may keep it
            yield buf, end
        raise
    if buf:
        yield buf, end


# ---------------------------------------------------------------------------------------------------- parts


class _Part:
    """One part being written: Megatron's IndexedDatasetBuilder on temporary names."""

    def __init__(self, prefix: Path, dtype):
        # lazy: cost (megatron.core, 4-6 s: jtok-data stats and blend import this module without it)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.dtype = dtype
        self.builder = IndexedDatasetBuilder(str(prefix) + ".bin.tmp", dtype=dtype)
        self.docs = self.tokens = self.chars = 0
        self.max_id = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray, max_id: int, chars: int) -> None:
        # One write per chunk: the chunk goes in as one multi-sequence "document" (add_document), then the
        # document boundaries are set after every sequence, which is what add_item + end_document per document
        # would have recorded (same .idx bytes; tested against the per-document path).
        b = self.builder
        first = len(b.sequence_lengths)
        b.add_document(flat, lengths.tolist())
        b.document_indices[-1:] = range(first + 1, first + len(lengths) + 1)
        self.docs += len(lengths)
        self.tokens += int(flat.size)
        self.chars += chars
        self.max_id = max(self.max_id, max_id)

    def commit(self, record_path: Path, record: Dict[str, Any]) -> Dict[str, Any]:
        self.builder.finalize(str(self.prefix) + ".idx.tmp")
        os.replace(str(self.prefix) + ".bin.tmp", str(self.prefix) + ".bin")
        os.replace(str(self.prefix) + ".idx.tmp", str(self.prefix) + ".idx")
        record.update(docs=self.docs, tokens=self.tokens, chars=self.chars, max_id=self.max_id)
        tmp = record_path.with_name(record_path.name + ".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, record_path)
        return record

    def discard(self) -> None:
        self.builder.data_file.close()
        for suf in (".bin.tmp", ".idx.tmp"):
            Path(str(self.prefix) + suf).unlink(missing_ok=True)


def _part_prefix(out: Path, i: int, sharded: bool) -> Path:
    return (out if sharded else out / PARTS_DIR) / f"{PREFIX_NAME}_{i:05d}"


def _record_path(out: Path, i: int) -> Path:
    return out / PARTS_DIR / f"part_{i:05d}.json"


def _finished_parts(out: Path, sharded: bool, settings_fp: str, digests: Sequence[str]) -> List[Dict]:
    """The parts of an earlier, interrupted build that this build can keep (a prefix of them); removes the rest.
    ``digests[i]``: the digest of the first i+1 input files (a part keeps if the files it read are unchanged)."""
    kept: List[Dict[str, Any]] = []
    i = 0
    while _record_path(out, i).is_file():
        try:
            rec = json.loads(_record_path(out, i).read_text())
            ok = (rec.get("settings") == settings_fp and rec.get("index") == i
                  and rec["end"][0] < len(digests)
                  and rec.get("inputs") == digests[rec["end"][0]])
            if ok:
                info = validate_indexed(_part_prefix(out, i, sharded))
                ok = info.num_documents == rec["docs"] and info.num_tokens == rec["tokens"]
        except (ValueError, KeyError, TypeError, IndexError, DataFileError):
            ok = False
        if not ok:
            break
        kept.append(rec)
        i += 1
    _remove_parts(out, sharded, start=i)
    return kept


def _remove_parts(out: Path, sharded: bool, start: int = 0) -> None:
    """Remove part records and part data numbered >= ``start`` (and every part of the other layout)."""
    pdir = out / PARTS_DIR

    def number(name: str, head: str) -> Optional[int]:
        digits = name[len(head):len(head) + 5]
        return int(digits) if name.startswith(head) and digits.isdigit() else None

    for d, here in ((pdir, not sharded), (out, sharded)):
        if not d.is_dir():
            continue
        for f in d.iterdir():
            i = number(f.name, PREFIX_NAME + "_")
            if i is not None and (i >= start or not here):
                f.unlink(missing_ok=True)
            j = number(f.name, "part_") if d == pdir else None
            if j is not None and j >= start:
                f.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ progress


class _Progress:
    """tqdm bar: documents (with docs/s) and tokens/s; silent when disabled."""

    def __init__(self, enabled: bool, total: Optional[int], initial: int, tokens0: int):
        self.bar = None
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.docs = 0
        self.last = 0.0
        if enabled:
            self.bar = tqdm(total=total, initial=initial, unit="doc", unit_scale=True, dynamic_ncols=True,
                            file=sys.stderr, desc="tokenizing", mininterval=0.5, smoothing=0.05)

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self.docs += docs
        if self.bar is None:
            return
        self.bar.update(docs)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.t0, 1e-9):,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):,.0f} tokens/s")
            self.bar.close()


# ------------------------------------------------------------------------------------------------- building


def _prepare_tokenizer(out: Path, files, tokenizer_path, eod_token, vocab_size, min_frequency, text_field,
                       max_doc_chars, log) -> Tokenizer:
    tok_path = out / TOKENIZER_NAME
    if tokenizer_path is not None:
        src = _tokenizer_file(tokenizer_path)
        tok_src = load_tokenizer(src, eod_token)  # errors name the given file, not the copy
        tmp = tok_path.with_name(TOKENIZER_NAME + ".tmp")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, tok_path)
        cfg_tmp = out / (CONFIG_NAME + ".tmp")
        cfg_tmp.write_text(json.dumps({"eos_token": tok_src.eod_token}) + "\n")
        os.replace(cfg_tmp, out / CONFIG_NAME)
        (out / TRAIN_STAMP).unlink(missing_ok=True)
        tok = load_tokenizer(tok_path)
        log(f"tokenizer: {src} ({tok.vocab_size:,} ids, end of document {tok.eod_token!r} = id {tok.eod})")
        return tok
    stamp = _sha({"vocab_size": vocab_size, "min_frequency": min_frequency, "text_field": text_field,
                  "max_doc_chars": max_doc_chars, "inputs": inputs_digest(files)})
    (out / CONFIG_NAME).unlink(missing_ok=True)
    if tok_path.is_file() and (out / TRAIN_STAMP).is_file():
        try:
            rec = json.loads((out / TRAIN_STAMP).read_text())
            if rec.get("stamp") == stamp and rec.get("sha256") == hashlib.sha256(tok_path.read_bytes()).hexdigest():
                tok = load_tokenizer(tok_path)
                log(f"tokenizer: trained earlier on the same inputs ({tok.vocab_size:,} ids), kept")
                return tok
        except ValueError:
            pass
    log(f"training byte-level BPE, vocab {vocab_size}, on {len(files)} input files")
    tok = train_tokenizer((d.text for d in iter_stream(files, text_field, max_doc_chars)), vocab_size, tok_path,
                          min_frequency)
    tmp = out / (TRAIN_STAMP + ".tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "sha256": tok.sha256}) + "\n")
    os.replace(tmp, out / TRAIN_STAMP)
    return tok


def build_dataset(
    source: Sources,
    out: PathLike,
    vocab_size: int = 4096,
    pattern: Optional[str] = None,
    max_doc_chars: Optional[int] = DEFAULT_MAX_DOC_CHARS,
    min_frequency: int = 2,
    tokenizer_path: Optional[PathLike] = None,
    force: bool = False,
    log=print,
    *,
    text_field: str = "text",
    eod_token: Optional[str] = None,
    workers: int = 1,
    shard_tokens: int = 0,
    part_tokens: int = DEFAULT_PART_TOKENS,
    chunk_docs: int = DEFAULT_CHUNK_DOCS,
    model_vocab_size: Optional[int] = None,
    progress: bool = False,
) -> BuildResult:
    """Build ``out/`` from ``source`` (one source specification or several, see
    :mod:`jtok_train.data.sources`); see the module doc.

    With ``tokenizer_path`` (a tokenizer.json, or a Hugging Face tokenizer directory) that tokenizer is copied
    to ``out/`` and used instead of training one (datasets blended together must share one); its end-of-document
    token is ``eod_token``, else its tokenizer_config.json's ``eos_token``, else a known one it holds.
    ``model_vocab_size``: fail early when the tokenizer has more ids than the model will.
    Returns the manifest (a :class:`BuildResult`) with ``skipped`` set.
    """
    out = Path(out)
    if workers < 1 or chunk_docs < 1 or part_tokens < 1 or shard_tokens < 0:
        raise ValueError(f"need workers >= 1, chunk_docs >= 1, part_tokens >= 1, shard_tokens >= 0 (got {workers}, "
                         f"{chunk_docs}, {part_tokens}, {shard_tokens})")
    sources = _source_list(source)
    files = resolve_inputs(sources, pattern)
    fp, settings = fingerprint_inputs(sources, vocab_size, pattern, max_doc_chars, min_frequency, tokenizer_path,
                                      text_field, eod_token, shard_tokens, chunk_docs, files=files)
    if not force:
        m = _up_to_date(out, fp)
        if m is not None:
            log(f"{out}: up to date (fingerprint {fp[:12]}), nothing to do; --force rebuilds")
            return _result(m, out, skipped=True)

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    sharded = bool(shard_tokens)
    if force:
        _remove_parts(out, sharded)
        (out / TRAIN_STAMP).unlink(missing_ok=True)
    tok = _prepare_tokenizer(out, files, tokenizer_path, eod_token, vocab_size, min_frequency, text_field,
                             max_doc_chars, log)
    _check_model_vocab(tok, model_vocab_size, tokenizer_path or out / TOKENIZER_NAME)
    settings_fp = _sha({k: v for k, v in settings.items() if k not in ("num_files", "total_bytes")}
                       | {"tokenizer": tok.sha256, "eod": tok.eod})
    writer = _PartWriter(out, sharded, token_dtype(tok.vocab_size), settings_fp, prefix_digests(files),
                         shard_tokens if sharded else part_tokens)
    if writer.parts:
        log(f"resuming after {len(writer.parts)} finished part(s): {writer.done_docs:,} documents, "
            f"{sum(p['tokens'] for p in writer.parts):,} tokens")
    log(f"tokenizing {len(files)} input file(s) with {workers} worker(s) into "
        + (f"shards of >= {shard_tokens:,} tokens" if sharded else f"{out / PREFIX_NAME}.bin/.idx"))
    # imported here, before the clock starts: its slow import is not counted as encoding time, nor is the
    # workers' start-up
    # lazy: cost (megatron.core, 4-6 s: jtok-data stats and blend import this module without it)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401
    pool = _start_workers(tok, out / TOKENIZER_NAME, workers)
    t_tok = time.perf_counter()
    cpu0 = _cpu_seconds()
    _encode(writer, iter_stream(files, text_field, max_doc_chars, writer.start), pool, workers, chunk_docs,
            _Progress(progress, count_records(files), writer.done_docs, 0))
    if not writer.parts:
        raise CorpusError(f"--source {' '.join(sources)}: the corpus has no non-empty documents")
    t_enc = time.perf_counter()
    cpu1 = _cpu_seconds()
    names, infos = _final_files(out, writer)
    t_end = time.perf_counter()
    manifest = _manifest(fp, settings, names, sharded, tok, infos, writer, workers)
    manifest["seconds"] = {"tokenizer": round(t_tok - t0, 3), "encode_write": round(t_enc - t_tok, 3),
                           "merge": round(t_end - t_enc, 3), "total": round(t_end - t0, 3)}
    # CPU seconds of the encode+write phase: this process (reading, writing; tokenizing too with 1 worker) and
    # the worker processes (tokenizing; their start-up included)
    manifest["cpu_seconds"] = {"main": round(cpu1[0] - cpu0[0], 3), "workers": round(cpu1[1] - cpu0[1], 3)}
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    return _result(manifest, out, skipped=False)


def _check_model_vocab(tok: Tokenizer, model_vocab_size: Optional[int], where: Any) -> None:
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {where} has {tok.vocab_size:,} ids, more than the model's vocabulary "
            f"({model_vocab_size:,}); use model.vocab_size={padded_vocab_size(tok.vocab_size)} (or more) and the "
            "same --model-vocab-size, or a smaller tokenizer")


class _PartWriter:
    """The build's output parts: the finished ones found on disk (a resumed build continues after them), the
    one being written, and the commit of a part once it holds ``limit`` tokens (a shard, or a part to merge)."""

    def __init__(self, out: Path, sharded: bool, dtype, settings_fp: str, digests: Sequence[str], limit: int):
        self.out, self.sharded, self.dtype, self.settings_fp, self.digests = out, sharded, dtype, settings_fp, digests
        self.limit = limit
        (out / PARTS_DIR).mkdir(exist_ok=True)
        self.parts = _finished_parts(out, sharded, settings_fp, digests)
        self.resumed = len(self.parts)
        self.start: Tuple[int, int] = tuple(self.parts[-1]["end"]) if self.parts else (0, 0)
        self.done_docs = sum(p["docs"] for p in self.parts)
        self.last_end: Tuple[int, int] = self.start
        self.part: Optional[_Part] = None

    def add(self, encoded, end: Tuple[int, int]) -> Tuple[int, int]:
        """One encoded chunk ending at input position ``end``; returns its (documents, tokens)."""
        flat, lengths, max_id, chars = encoded
        if self.part is None:
            self.part = _Part(_part_prefix(self.out, len(self.parts), self.sharded), self.dtype)
        self.part.add(flat, lengths, max_id, chars)
        self.last_end = end
        if self.part.tokens >= self.limit:
            self.commit()
        return len(lengths), int(flat.size)

    def commit(self) -> None:
        """The part being written, if it holds documents, becomes a finished part (resumable after)."""
        if self.part is None or not self.part.docs:
            return
        rec = {"index": len(self.parts), "settings": self.settings_fp, "end": list(self.last_end),
               "inputs": self.digests[self.last_end[0]]}
        self.parts.append(self.part.commit(_record_path(self.out, len(self.parts)), rec))
        self.part = None

    def discard(self) -> None:
        if self.part is not None:
            self.part.discard()
            self.part = None


def _encode(writer: _PartWriter, docs: Iterator, pool: Any, workers: int, chunk_docs: int,
            bar: "_Progress") -> None:
    """Tokenize ``docs`` in chunks on the ``workers`` of ``pool`` (2 chunks in flight per worker; shut down at
    the end) into ``writer``'s parts, in input order. A bad input file (CorpusError) keeps what was read before
    it when the output is one file (shard boundaries must not move), then re-raises."""
    inflight: deque = deque()

    def write_oldest() -> None:
        fut, end = inflight.popleft()
        bar.update(*writer.add(fut.result(), end))

    try:
        try:
            for texts, end in _chunks(docs, chunk_docs):
                inflight.append((pool.submit(_encode_chunk, texts), end))
                if len(inflight) >= 2 * workers:
                    write_oldest()
        except CorpusError:
            if not writer.sharded:
                while inflight:
                    write_oldest()
                writer.commit()
            raise
        while inflight:
            write_oldest()
        writer.commit()
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)
        writer.discard()


def _final_files(out: Path, writer: _PartWriter) -> Tuple[List[str], List[Any]]:
    """The finished parts as the build's datasets: the shards as they are, or the parts merged into one
    ``.bin``/``.idx``; each validated and given its token-id counts (the hot rows of parallel.hot_rows)."""
    n = len(writer.parts)
    if writer.sharded:
        names = [_part_prefix(out, i, True).name for i in range(n)]
        for stale in (PREFIX_NAME + ".bin", PREFIX_NAME + ".idx"):
            (out / stale).unlink(missing_ok=True)
    else:
        _merge([_part_prefix(out, i, False) for i in range(n)], out / PREFIX_NAME, writer.dtype)
        names = [PREFIX_NAME]
    infos = [validate_indexed(out / name) for name in names]
    for name in names:
        write_token_counts(str(out / name))
    return names, infos


def _manifest(fp: str, settings: Dict[str, Any], names: List[str], sharded: bool, tok: Tokenizer,
              infos: List[Any], writer: _PartWriter, workers: int) -> Dict[str, Any]:
    parts = writer.parts
    return {
        "fingerprint": fp,
        "settings": settings,
        "prefix": names[0] if not sharded else None,
        "prefixes": names,
        "tokenizer": TOKENIZER_NAME,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "padded_vocab_size": padded_vocab_size(tok.vocab_size),
        "eod": tok.eod,
        "eod_token": tok.eod_token,
        "documents": sum(i.num_documents for i in infos),
        "tokens": sum(i.num_tokens for i in infos),
        "characters": int(sum(p["chars"] for p in parts)),
        "max_token_id": int(max(max(p["max_id"] for p in parts), tok.eod)),
        "dtype": np.dtype(infos[0].dtype).name,
        "token_counts": [n + COUNTS_SUFFIX for n in names],
        "bin_bytes": sum(i.bin_bytes for i in infos),
        "workers": workers,
        "resumed_parts": writer.resumed,
    }


def _cpu_seconds() -> Tuple[float, float]:
    """(this process, its finished child processes) user + system CPU seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _merge(prefixes: Sequence[Path], dest: Path, dtype) -> None:
    """Concatenate part datasets into ``dest`` (.bin/.idx), streaming: the .bin files are copied, the .idx is
    written section by section from each part's memory-mapped index (``read_index``), so memory holds one
    part's index at most. The bytes are those of Megatron's ``IndexedDatasetBuilder.add_index`` + ``finalize``
    (tested), which would hold the whole index as Python lists (~60 bytes a document): written here for that."""
    if len(prefixes) == 1:
        os.replace(str(prefixes[0]) + ".bin", str(dest) + ".bin")
        os.replace(str(prefixes[0]) + ".idx", str(dest) + ".idx")
        return

    def parts() -> Iterator[Tuple[Any, np.ndarray, np.ndarray, np.ndarray]]:
        for p in prefixes:
            info, lengths, pointers, docs = read_index(p)
            if np.dtype(info.dtype) != np.dtype(dtype):
                raise DataFileError(f"part {p}.idx has dtype {np.dtype(info.dtype)}, expected {np.dtype(dtype)}; "
                                    "rerun with --force")
            yield info, lengths, pointers, docs
            del lengths, pointers, docs

    n_seq = n_doc = 0
    with open(str(dest) + ".bin.tmp", "wb") as fout:
        for p, (info, *_) in zip(prefixes, parts()):
            n_seq += info.num_sequences
            n_doc += info.num_documents  # without each part's leading 0
            with open(str(p) + ".bin", "rb") as fin:
                shutil.copyfileobj(fin, fout, 16 << 20)
    itemsize = np.dtype(dtype).itemsize
    with open(str(dest) + ".idx.tmp", "wb") as f:
        f.write(index_header(dtype, n_seq, n_doc + 1))
        for _, lengths, _, _ in parts():  # sequence lengths
            f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        byte_offset = 0
        for _, lengths, pointers, _ in parts():  # sequence pointers, shifted by the bytes of the parts before
            f.write((np.asarray(pointers, dtype=np.int64) + byte_offset).tobytes())
            byte_offset += int(np.asarray(lengths, dtype=np.int64).sum()) * itemsize
        f.write(np.zeros(1, dtype=np.int64).tobytes())
        seq_offset = 0
        for info, _, _, docs in parts():  # document boundaries, shifted by the sequences of the parts before
            f.write((np.asarray(docs[1:], dtype=np.int64) + seq_offset).tobytes())
            seq_offset += info.num_sequences
    os.replace(str(dest) + ".bin.tmp", str(dest) + ".bin")
    os.replace(str(dest) + ".idx.tmp", str(dest) + ".idx")


def _result(m: Dict[str, Any], out: Path, skipped: bool) -> BuildResult:
    r = BuildResult(m)
    r["skipped"] = skipped
    names = _output_prefixes(m)
    r["prefix_paths"] = [str(out / n) for n in names]
    r["prefix_path"] = r["prefix_paths"][0]
    return r


def blend_config(members: Sequence[Tuple[PathLike, float]]) -> str:
    """YAML for a Hydra ``data`` group file (``data/`` of your own config directory, or of
    ``jtok_train/configs/``): the prefixes and weights of a blend of built dataset directories.

    Each member is (directory with a manifest.json, weight); a sharded dataset's weight is shared among its shards
    in proportion to their tokens, so the blend draws from each dataset as asked. All members must share one
    tokenizer (checked by sha256)."""
    prefixes: List[str] = []
    weights: List[float] = []
    sha = tok = None
    for d, w in members:
        mpath = Path(d) / MANIFEST_NAME
        if not mpath.is_file():
            raise DataFileError(f"{mpath} is missing: build the dataset first (`jtok-data build --out {d} ...`)")
        m = json.loads(mpath.read_text())
        if sha is None:
            sha, tok = m["tokenizer_sha256"], str(Path(d) / m.get("tokenizer", TOKENIZER_NAME))
        elif m["tokenizer_sha256"] != sha:
            raise DataFileError(f"{d} was built with another tokenizer than {tok}; rebuild it with "
                                f"`jtok-data build --tokenizer {tok} --out {d} --force ...`")
        infos = [validate_indexed(Path(d) / n) for n in _output_prefixes(m)]
        total = sum(i.num_tokens for i in infos)
        for i in infos:
            prefixes.append(i.prefix)
            weights.append(float(w) * i.num_tokens / max(total, 1))
    lines = ["# written by `jtok-data blend`: " + " ".join(f"{d}:{w}" for d, w in members), "prefixes:"]
    lines += [f"  - {p}" for p in prefixes]
    lines += ["weights: [" + ", ".join(f"{w:.6g}" for w in weights) + "]", f"tokenizer: {tok}", 'split: "98,2,0"']
    return "\n".join(lines) + "\n"


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
