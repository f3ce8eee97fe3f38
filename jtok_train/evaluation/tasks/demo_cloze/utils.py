"""demo_cloze's data loader: the JSONL file beside this YAML (found from this file, whatever the cwd), read
into memory (no dataset cache is written)."""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "demo_cloze.jsonl"


def load_demo_cloze(**kwargs):
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
