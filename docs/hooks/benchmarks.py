"""MkDocs hook (mkdocs.yml, ``hooks:``) for the two Benchmarks pages.

- ``benchmarks.md`` includes ``BENCHMARKS.md`` from the repository's root (pymdownx.snippets). The images it shows
  are linked relative to the root (``benchmarks/quality/plots/...``), so each one is added to the site under the
  same path: the links then resolve from the page as they do on the repository.
- ``benchmarks-log.md``: the marker line is replaced by a table generated from
  ``benchmarks/results/history.jsonl`` (one record per measured run), newest first, each measure linked to its
  section on the Benchmarks page.

Nothing is copied by hand: the build reads both files, and the strict build fails on a broken link or anchor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HISTORY = ROOT / "benchmarks" / "results" / "history.jsonl"
LOG_PAGE = "benchmarks-log.md"
MARKER = "<!-- benchmarks-history-table -->"
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def history() -> list[dict]:
    """The records of history.jsonl, one a line (blank lines skipped)."""
    records = []
    for n, line in enumerate(HISTORY.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PluginError(f"{HISTORY.name} line {n}: {e}") from e
    return records


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def history_table(records: list[dict]) -> str:
    """The log page's table: date, measure (linked to its section), shown or superseded, notes."""
    rows = ["| date | measure | on the Benchmarks page | notes |", "|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["date"], r["measure"]), reverse=True):
        anchor = slugify(r["section"], "-")
        shown = "**current**" if r.get("current") else "superseded"
        rows.append(f"| {r['date']} | [`{r['measure']}`](benchmarks.md#{anchor}) | {shown} | {_cell(r.get('notes', ''))} |")
    return "\n".join(rows)


def on_files(files: Files, config) -> Files:
    for rel in _IMAGE.findall(BENCHMARKS.read_text(encoding="utf-8")):
        src = ROOT / rel
        if "://" not in rel and src.is_file() and files.get_file_from_path(rel) is None:
            files.append(File.generated(config, rel, abs_src_path=str(src)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != LOG_PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{LOG_PAGE}: the marker line {MARKER} is missing")
    records = history()
    return markdown.replace(MARKER, f"{len(records)} runs.\n\n" + history_table(records))
