"""Text corpora for dataset building: the demo corpus (Python 3.11 docs), directories of text files, JSONL.

Every function here yields :class:`Document` objects in a deterministic order (sorted paths, file order for
JSONL), so a corpus always produces the same token stream and the same dataset on every machine.

The demo corpus is the reStructuredText source of the Python 3.11 documentation, shipped by the Debian package
``python3.11-doc`` under ``/usr/share/doc/python3.11/html/_sources`` (497 ``*.rst.txt`` files, ~12 MB). Large
files are split on their top-level section headings so that the corpus has more, shorter documents (a 300 KB
library reference page becomes one document per section).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "Document",
    "CorpusError",
    "PYTHON_DOCS_DIRS",
    "PYTHON_DOCS_PATTERN",
    "TEXT_SUFFIXES",
    "DEFAULT_MAX_DOC_CHARS",
    "find_python_docs",
    "iter_documents",
    "iter_jsonl",
    "iter_corpus",
    "corpus_files",
    "resolve_source",
    "split_on_headings",
]

PYTHON_DOCS_DIRS: Tuple[str, ...] = (
    "/usr/share/doc/python3.11/html/_sources",
    "/usr/share/doc/python3.11-doc/html/_sources",
)
PYTHON_DOCS_PATTERN = "**/*.rst.txt"
# Suffixes picked up from a plain directory when no pattern is given.
TEXT_SUFFIXES: Tuple[str, ...] = (".txt", ".md", ".rst")
# Files longer than this (characters) are split on their top-level section headings.
DEFAULT_MAX_DOC_CHARS = 16_384


class CorpusError(RuntimeError):
    """A corpus source that cannot be read; the message says what to do."""


class Document(NamedTuple):
    """One training document: ``name`` is ``relative/path[#part]`` (or ``file.jsonl:line``)."""

    name: str
    text: str


def find_python_docs(candidates: Sequence[str] = PYTHON_DOCS_DIRS) -> Path:
    """Return the directory holding the Python 3.11 documentation sources (``*.rst.txt``).

    Raises :class:`CorpusError` telling the user how to get them when none of ``candidates`` exists.
    """
    for cand in candidates:
        p = Path(cand)
        if p.is_dir() and any(p.glob("*.rst.txt")):
            return p
    raise CorpusError(
        "Python 3.11 documentation sources not found (looked in "
        + ", ".join(candidates)
        + "). Install them with `apt-get install -y python3.11-doc`, or pass a directory of "
        ".txt/.md/.rst files or a .jsonl file with a \"text\" field as --source."
    )


# ----------------------------------------------------------------------------------------------------------
# Section splitting
# ----------------------------------------------------------------------------------------------------------

_ADORN_CHARS = set("=-`:'\"~^_*+#<>.")


def _is_adornment(line: str) -> bool:
    s = line.rstrip()
    return len(s) >= 3 and s[0] in _ADORN_CHARS and s == s[0] * len(s)


def _rst_headings(lines: List[str]) -> List[Tuple[int, Tuple[str, bool]]]:
    """Find reST section titles: (index of the first line of the heading block, style)."""
    out: List[Tuple[int, Tuple[str, bool]]] = []
    i = 0
    n = len(lines)
    while i < n - 1:
        title = lines[i].rstrip()
        under = lines[i + 1]
        if (
            title.strip()
            and not title[0].isspace()
            and not _is_adornment(title)
            and _is_adornment(under)
            and len(under.rstrip()) >= len(title)
        ):
            ch = under.rstrip()[0]
            over = i > 0 and lines[i - 1].rstrip() == under.rstrip()
            out.append((i - 1 if over else i, (ch, over)))
            i += 2
            continue
        i += 1
    return out


def _md_headings(lines: List[str]) -> List[Tuple[int, Tuple[str, bool]]]:
    out: List[Tuple[int, Tuple[str, bool]]] = []
    fence = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            m = re.match(r"(#{1,6}) \S", line)
            if m:
                out.append((i, (m.group(1), False)))
    return out


def split_on_headings(text: str, markdown: bool = False) -> List[str]:
    """Split a document before each of its top-level section headings.

    "Top level" means the first two heading styles the document uses (reST assigns levels by order of first
    appearance: level 1 is normally the page title, level 2 its sections). Text before the first split point
    stays with the first part. Returns ``[text]`` when there is nothing to split on.
    """
    lines = text.splitlines(keepends=True)
    heads = _md_headings(lines) if markdown else _rst_headings(lines)
    styles: List[Tuple[str, bool]] = []
    for _, st in heads:
        if st not in styles:
            styles.append(st)
    top = set(styles[:2])
    cuts = sorted({idx for idx, st in heads if st in top and idx > 0})
    if not cuts:
        return [text]
    parts: List[str] = []
    prev = 0
    for c in cuts:
        chunk = "".join(lines[prev:c])
        if chunk.strip():
            parts.append(chunk)
        prev = c
    chunk = "".join(lines[prev:])
    if chunk.strip():
        parts.append(chunk)
    return parts


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


def corpus_files(root: os.PathLike | str, pattern: Optional[str] = None) -> List[Path]:
    """Sorted list of the files a directory corpus reads.

    ``pattern`` is a glob relative to ``root`` (``**`` recurses); without one, every file under ``root`` whose
    name ends in .txt, .md or .rst (including ``*.rst.txt``) is taken.
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus directory {root} does not exist or is not a directory")
    if pattern:
        files = [p for p in root.glob(pattern) if p.is_file()]
    else:
        files = [p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES)]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def iter_documents(
    root: os.PathLike | str,
    pattern: Optional[str] = None,
    max_doc_chars: Optional[int] = DEFAULT_MAX_DOC_CHARS,
) -> Iterator[Document]:
    """Yield the documents of a directory corpus, in sorted path order.

    One document per file; a file longer than ``max_doc_chars`` characters is split on its top-level section
    headings (reST, or Markdown for ``.md``). ``max_doc_chars=None`` never splits. Files are read as UTF-8
    (undecodable bytes replaced); empty files are skipped.
    """
    root = Path(root)
    files = corpus_files(root, pattern)
    if not files:
        raise CorpusError(
            f"no text files found under {root}"
            + (f" matching {pattern!r}" if pattern else " (looked for *.txt, *.md, *.rst)")
        )
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        rel = path.relative_to(root).as_posix()
        if max_doc_chars is not None and len(text) > max_doc_chars:
            parts = split_on_headings(text, markdown=path.suffix.lower() == ".md")
        else:
            parts = [text]
        if len(parts) == 1:
            yield Document(rel, parts[0])
        else:
            for k, part in enumerate(parts):
                yield Document(f"{rel}#{k}", part)


def iter_jsonl(path: os.PathLike | str, field: str = "text") -> Iterator[Document]:
    """Yield one document per line of a JSONL file, taking the string in ``field``; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"JSONL corpus {path} does not exist")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise CorpusError(f"{path}:{lineno}: expected an object with a string field {field!r}")
            if rec[field].strip():
                yield Document(f"{path.name}:{lineno}", rec[field])


def resolve_source(source: str) -> Tuple[str, Path]:
    """Map a ``--source`` value to (kind, path): kind is "python-docs", "dir" or "jsonl"."""
    if source == "python-docs":
        return "python-docs", find_python_docs()
    p = Path(source).expanduser()
    if p.is_dir():
        return "dir", p.resolve()
    if p.is_file() and p.suffix.lower() in (".jsonl", ".json"):
        return "jsonl", p.resolve()
    if p.is_file():
        raise CorpusError(f"--source {source}: a file source must be a .jsonl file with a \"text\" field")
    raise CorpusError(
        f"--source {source}: no such directory or file (use 'python-docs', a directory of .txt/.md/.rst "
        "files, or a .jsonl file)"
    )


def iter_corpus(
    source: str,
    pattern: Optional[str] = None,
    max_doc_chars: Optional[int] = DEFAULT_MAX_DOC_CHARS,
) -> Iterator[Document]:
    """Documents of any supported source: "python-docs", a directory, or a .jsonl file."""
    kind, path = resolve_source(source)
    if kind == "jsonl":
        return iter_jsonl(path)
    if kind == "python-docs":
        pattern = pattern or PYTHON_DOCS_PATTERN
    return iter_documents(path, pattern, max_doc_chars)
