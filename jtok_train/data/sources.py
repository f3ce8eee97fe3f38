"""Streaming corpus sources: parquet shards, JSONL (plain, .gz, .zst), Hugging Face ``save_to_disk`` directories,
directories of text files, and the demo corpus; several of them in one build.

A build reads an ordered list of **input files** (:class:`InputFile`): the sources in the order given, and the
files of each source sorted by path. Each file yields **records** in file order (a parquet/arrow row, a JSONL
line, a section of a text file); a record whose text is empty or only whitespace is dropped, the others are the
documents. ``(file index, record index)`` is therefore a stable position in the stream: a resumed build
restarts reading right after the last document it wrote (:func:`iter_stream` with ``start``).

Nothing is held beyond one record batch: parquet is read a record batch at a time (pyarrow's
``ParquetFile.iter_batches``, only the text column), the arrow files of a ``save_to_disk`` directory with
pyarrow's IPC stream reader (the format ``datasets`` writes; regular reads, no memory map, so the resident set
does not grow with the corpus), JSONL line by line through ``gzip`` / ``zstandard`` stream decoders.

Source specifications (``--source``, repeatable):

- ``python-docs``: the Python 3.11 documentation sources (``apt-get install -y python3.11-doc``);
- ``DIR``: a ``datasets.save_to_disk`` directory (it holds ``state.json``); else every ``*.parquet`` under DIR
  when there are some; else every ``*.jsonl[.gz|.zst]``; else the text files (``*.txt, *.md, *.rst`` or
  ``--pattern``);
- ``FILE.parquet``, ``FILE.jsonl``, ``FILE.jsonl.gz``, ``FILE.jsonl.zst`` (``.json`` too, one object a line);
- a glob (``shards/*.parquet``, ``data/**/*.jsonl.gz``), expanded and sorted;
- ``KIND:PATH`` forces the kind of a directory or glob: ``parquet:``, ``jsonl:``, ``text:``, ``hf:``.
"""

from __future__ import annotations

import glob as _glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from jtok_train.data.corpus import (
    DEFAULT_MAX_DOC_CHARS,
    PYTHON_DOCS_PATTERN,
    CorpusError,
    corpus_files,
    find_python_docs,
    split_on_headings,
)

__all__ = ["InputFile", "StreamDoc", "resolve_inputs", "inputs_digest", "prefix_digests", "iter_stream",
           "count_records", "JSONL_SUFFIXES", "KINDS"]

JSONL_SUFFIXES: Tuple[str, ...] = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
KINDS = ("parquet", "jsonl", "text", "hf")
# rows per parquet / arrow record batch: bounds what is in memory at once (~ batch x mean document size)
BATCH_ROWS = 1024


@dataclass(frozen=True)
class InputFile:
    """One file of the stream: ``kind`` is text, parquet, jsonl or arrow; ``name`` is what messages show."""

    kind: str
    path: str
    size: int
    name: str


@dataclass(frozen=True)
class StreamDoc:
    """A document and its position: file ``file`` (index into the input list), record ``record`` of it."""

    file: int
    record: int
    text: str


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _jsonl_like(p: Path) -> bool:
    return p.name.lower().endswith(JSONL_SUFFIXES)


def _hf_files(d: Path, spec: str) -> List[Path]:
    """The arrow files of a ``save_to_disk`` directory, in the order its state.json lists them."""
    if (d / "dataset_dict.json").is_file() and not (d / "state.json").is_file():
        try:
            splits = json.loads((d / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, OSError):
            splits = []
        raise CorpusError(f"--source {spec}: {d} is a DatasetDict (splits: {', '.join(splits) or '?'}); pass one "
                          f"split's directory, e.g. --source {d / (splits[0] if splits else 'train')}")
    try:
        state = json.loads((d / "state.json").read_text())
        files = [d / f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CorpusError(f"--source {spec}: {d / 'state.json'} is not a datasets.save_to_disk state file "
                          f"({type(e).__name__}: {e}); save the dataset again with Dataset.save_to_disk") from None
    if state.get("_indices_data_files"):
        raise CorpusError(f"--source {spec}: {d} holds an indices mapping; save a flattened copy "
                          "(Dataset.flatten_indices().save_to_disk(...))")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CorpusError(f"--source {spec}: {missing[0]} listed in {d / 'state.json'} is missing; copy the whole "
                          "save_to_disk directory again")
    return files


def _one_source(spec: str, pattern: Optional[str]) -> List[InputFile]:
    kind: Optional[str] = None
    s = spec
    head, sep, tail = spec.partition(":")
    if sep and head in KINDS and tail:
        kind, s = head, tail
    if s == "python-docs" and kind is None:
        root = find_python_docs()
        return [InputFile("text", str(p), p.stat().st_size, p.relative_to(root).as_posix())
                for p in corpus_files(root, pattern or PYTHON_DOCS_PATTERN)]
    p = Path(s).expanduser()
    if _is_glob(s) and not p.exists():
        paths = sorted(Path(x) for x in _glob.glob(os.path.expanduser(s), recursive=True) if os.path.isfile(x))
        if not paths:
            raise CorpusError(f"--source {spec}: the glob matches no file")
        if kind is None:
            kinds = {"parquet" if q.suffix.lower() == ".parquet" else "jsonl" if _jsonl_like(q) else "text"
                     for q in paths}
            if len(kinds) > 1:
                raise CorpusError(f"--source {spec}: the glob matches files of several kinds "
                                  f"({', '.join(sorted(kinds))}); narrow it, e.g. to *.parquet")
            kind = kinds.pop()
        return [InputFile(_file_kind(kind), str(q), q.stat().st_size, str(q)) for q in paths]
    if p.is_file():
        if kind is None:
            if p.suffix.lower() == ".parquet":
                kind = "parquet"
            elif _jsonl_like(p):
                kind = "jsonl"
            else:
                raise CorpusError(f"--source {spec}: a file source must be .parquet, .jsonl, .jsonl.gz or .jsonl.zst "
                                  "(or a directory of text files)")
        return [InputFile(_file_kind(kind), str(p.resolve()), p.stat().st_size, p.name)]
    if p.is_dir():
        root = p.resolve()
        if kind is None:
            if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
                kind = "hf"
            elif pattern is None and any(root.rglob("*.parquet")):
                kind = "parquet"
            elif pattern is None and any(_jsonl_like(q) for q in root.rglob("*.json*")):
                kind = "jsonl"
            else:
                kind = "text"
        if kind == "hf":
            return [InputFile("arrow", str(q), q.stat().st_size, f"{root.name}/{q.name}")
                    for q in _hf_files(root, spec)]
        if kind == "text":
            files = corpus_files(root, pattern)
            if not files:
                raise CorpusError(f"no text files found under {root}"
                                  + (f" matching {pattern!r}" if pattern else " (looked for *.txt, *.md, *.rst)"))
        elif kind == "parquet":
            files = corpus_files(root, pattern or "**/*.parquet")
        else:
            files = [q for q in corpus_files(root, pattern or "**/*") if _jsonl_like(q)]
        if not files:
            raise CorpusError(f"--source {spec}: no {kind} files under {root}")
        return [InputFile(_file_kind(kind), str(q), q.stat().st_size, q.relative_to(root).as_posix()) for q in files]
    raise CorpusError(f"--source {spec}: no such directory or file (use 'python-docs', a directory, a .parquet or "
                      ".jsonl[.gz|.zst] file, or a glob)")


def _file_kind(kind: str) -> str:
    return "arrow" if kind == "hf" else kind


def resolve_inputs(sources: Sequence[str], pattern: Optional[str] = None) -> List[InputFile]:
    """The ordered input files of ``sources`` (see the module doc); raises :class:`CorpusError`."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise CorpusError("no --source given")
    out: List[InputFile] = []
    for s in sources:
        out.extend(_one_source(str(s), pattern))
    return out


def inputs_digest(files: Sequence[InputFile]) -> str:
    """sha256 of the (kind, path, size) of ``files``, in order: what a resumed build checks its parts against."""
    return prefix_digests(files)[-1] if files else hashlib.sha256().hexdigest()


def prefix_digests(files: Sequence[InputFile]) -> List[str]:
    """``[inputs_digest(files[:1]), inputs_digest(files[:2]), ...]`` in one pass."""
    h = hashlib.sha256()
    out: List[str] = []
    for f in files:
        h.update(json.dumps([f.kind, f.path, f.size]).encode())
        out.append(h.copy().hexdigest())
    return out


# ------------------------------------------------------------------------------------------------ readers


def _unreadable(f: InputFile, e: BaseException) -> CorpusError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CorpusError(f"input file {f.path} is unreadable ({type(e).__name__}: {msg}); re-download or repair it, "
                       "or leave it out of --source, then rerun the same command: the parts already written are "
                       "kept")


def _missing_field(f: InputFile, field: str, have: Sequence[str]) -> CorpusError:
    fields = ", ".join(map(repr, have)) or "none"
    return CorpusError(f"input file {f.path} has no text field {field!r} (it has: {fields}); pass --text-field with "
                       "one of those")


def _text_records(f: InputFile, max_doc_chars: Optional[int], start: int) -> Iterator[Tuple[int, str]]:
    try:
        text = Path(f.path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise _unreadable(f, e) from None
    if max_doc_chars is not None and len(text) > max_doc_chars:
        parts = split_on_headings(text, markdown=f.path.lower().endswith(".md"))
    else:
        parts = [text]
    for k in range(start, len(parts)):
        yield k, parts[k]


def _open_text(f: InputFile) -> io.TextIOBase:
    low = f.path.lower()
    if low.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(f.path, "rb"), encoding="utf-8")
    if low.endswith(".zst"):
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(f.path, "rb"), closefd=True),
                                encoding="utf-8")
    return open(f.path, "r", encoding="utf-8")


def _jsonl_records(f: InputFile, field: str, start: int) -> Iterator[Tuple[int, str]]:
    try:
        fh = _open_text(f)
    except OSError as e:
        raise _unreadable(f, e) from None
    with fh:
        lineno = -1
        while True:
            try:
                line = fh.readline()
            except Exception as e:  # gzip: OSError/EOFError, zstandard.ZstdError, a bad UTF-8 byte
                raise _unreadable(f, e) from None
            if not line:
                return
            lineno += 1
            if lineno < start or not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"input file {f.path}, line {lineno + 1}: not valid JSON ({e.msg}); repair the file "
                                  "or leave it out of --source") from None
            if not isinstance(rec, dict) or field not in rec:
                raise _missing_field(f, field, list(rec) if isinstance(rec, dict) else [])
            t = rec[field]
            if t is not None and not isinstance(t, str):
                raise CorpusError(f"input file {f.path}, line {lineno + 1}: field {field!r} is a {type(t).__name__}, "
                                  "not a string; pass --text-field naming a text field")
            yield lineno, t or ""


def _batches_records(f: InputFile, batches, field: str, start: int) -> Iterator[Tuple[int, str]]:
    """Records of an iterator of (first row index, pyarrow RecordBatch) from row ``start`` on."""
    for first, batch in batches:
        n = batch.num_rows
        if first + n <= start:
            continue
        col = batch.column(batch.schema.get_field_index(field)).to_pylist()
        for i in range(max(0, start - first), n):
            t = col[i]
            if t is not None and not isinstance(t, str):
                raise CorpusError(f"input file {f.path}: column {field!r} holds {type(t).__name__} values, not "
                                  "strings; pass --text-field naming a string column")
            yield first + i, t or ""


def _parquet_batches(f: InputFile, field: str, start: int):
    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a corrupt or truncated file
        raise _unreadable(f, e) from None
    names = pf.schema_arrow.names
    if field not in names:
        raise _missing_field(f, field, names)
    md = pf.metadata
    first = 0
    for rg in range(md.num_row_groups):
        n = md.row_group(rg).num_rows
        if first + n <= start:  # resuming: skip whole row groups without reading them
            first += n
            continue
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=[field]):
                yield first, batch
                first += batch.num_rows
        except Exception as e:  # a corrupt page or row group
            raise _unreadable(f, e) from None


def _arrow_batches(f: InputFile, field: str):
    try:
        src = pa.OSFile(f.path, "rb")
        reader = pa.ipc.open_stream(src)
    except Exception as e:
        raise _unreadable(f, e) from None
    if field not in reader.schema.names:
        raise _missing_field(f, field, reader.schema.names)
    first = 0
    with src:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except Exception as e:
                raise _unreadable(f, e) from None
            yield first, batch
            first += batch.num_rows


def _records(f: InputFile, field: str, max_doc_chars: Optional[int], start: int) -> Iterator[Tuple[int, str]]:
    if f.kind == "text":
        return _text_records(f, max_doc_chars, start)
    if f.kind == "jsonl":
        return _jsonl_records(f, field, start)
    if f.kind == "parquet":
        return _batches_records(f, _parquet_batches(f, field, start), field, start)
    if f.kind == "arrow":
        return _batches_records(f, _arrow_batches(f, field), field, start)
    raise ValueError(f"unknown input kind {f.kind!r}")


def iter_stream(
    files: Sequence[InputFile],
    text_field: str = "text",
    max_doc_chars: Optional[int] = DEFAULT_MAX_DOC_CHARS,
    start: Tuple[int, int] = (0, 0),
) -> Iterator[StreamDoc]:
    """The documents of ``files`` from position ``start`` = (file index, record index) on."""
    f0, r0 = start
    for i in range(f0, len(files)):
        for rec, text in _records(files[i], text_field, max_doc_chars, r0 if i == f0 else 0):
            if text.strip():
                yield StreamDoc(i, rec, text)


def count_records(files: Sequence[InputFile]) -> Optional[int]:
    """Total records when every file states it cheaply (parquet metadata), else None (for the progress bar)."""
    if not files or any(f.kind != "parquet" for f in files):
        return None
    try:
        return sum(pq.ParquetFile(f.path).metadata.num_rows for f in files)
    except Exception:
        return None
