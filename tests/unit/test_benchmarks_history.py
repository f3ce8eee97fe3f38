"""benchmarks/results/history.jsonl and BENCHMARKS.md agree: every record parses and has the required fields,
each measure has exactly one current record, and the current record's section in BENCHMARKS.md exists and shows
its date. The sections that code and tests cite by name are there too."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.check

ROOT = Path(__file__).resolve().parents[2]
HISTORY = ROOT / "benchmarks" / "results" / "history.jsonl"
BENCHMARKS = ROOT / "BENCHMARKS.md"
REQUIRED = {"date": str, "measure": str, "section": str, "machine": str, "command": str, "figures": dict,
            "notes": str, "current": bool}
# cited by name elsewhere: tests/distributed/test_sharded_table.py, the Makefile, docs/testing.md (its anchor),
# benchmarks/quality/eval_best.py, benchmarks/quality/README.md
CITED = ["Overlap on vs off", "Test suite", "Downstream evaluation", "Static JTok's defaults and a table-size sweep"]
_HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$")


def _records() -> list[dict]:
    return [json.loads(line) for line in HISTORY.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sections() -> dict[str, str]:
    """Heading text -> the section's text (up to the next heading of the same or a higher level)."""
    lines = BENCHMARKS.read_text(encoding="utf-8").splitlines()
    heads = [(i, len(m.group(1)), m.group(2)) for i, line in enumerate(lines) if (m := _HEADING.match(line))]
    out = {}
    for k, (i, level, title) in enumerate(heads):
        end = next((j for j, lv, _ in heads[k + 1:] if lv <= level), len(lines))
        out[title] = "\n".join(lines[i:end])
    return out


def test_every_record_parses_with_the_required_fields():
    for n, line in enumerate(HISTORY.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"history.jsonl line {n} is blank"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            pytest.fail(f"history.jsonl line {n} does not parse: {e}")
        for key, kind in REQUIRED.items():
            assert isinstance(rec.get(key), kind), f"line {n} ({rec.get('measure')}): {key} missing or not {kind.__name__}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", rec["date"]), f"line {n}: date {rec['date']!r}"
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", rec["measure"]), f"line {n}: measure {rec['measure']!r}"
        assert rec["figures"] and rec["notes"].strip() and rec["command"].strip(), f"line {n}: empty figures/notes/command"
        files = rec.get("file", [])
        for f in [files] if isinstance(files, str) else files:
            assert (ROOT / f).is_file(), f"line {n}: file {f} does not exist"


def test_each_measure_has_exactly_one_current_record():
    recs = _records()
    current = Counter(r["measure"] for r in recs if r["current"])
    for measure in {r["measure"] for r in recs}:
        assert current[measure] == 1, f"{measure}: {current[measure]} current records"


def test_each_current_record_has_its_section_and_date_in_benchmarks_md():
    sections = _sections()
    for r in _records():
        if r["current"]:
            assert r["section"] in sections, f"{r['measure']}: no section {r['section']!r} in BENCHMARKS.md"
            assert r["date"] in sections[r["section"]], f"{r['measure']}: {r['date']} not in its section {r['section']!r}"


def test_the_sections_cited_elsewhere_exist():
    titles = list(_sections())
    for cited in CITED:
        assert any(t.startswith(cited) for t in titles), f"BENCHMARKS.md lost the section {cited!r}"
