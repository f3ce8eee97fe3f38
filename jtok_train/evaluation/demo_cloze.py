"""Build ``demo_cloze``: a 4-way multiple-choice cloze task from the held-out part of a jtok-train dataset.

The held-out part is the validation split's documents (the trainer's ``data.split``, "98,2,0" by default:
Megatron's GPTDataset gives the last 2% of the documents to validation), so no item was trained on. Each
item is a passage of ``context_words`` words from one such document (passages start every half passage); the
right ending is the passage's next ``answer_words`` words; the three wrong endings are spans of the same
length from other held-out documents.
A model that has learnt the corpus's syntax and vocabulary picks the right one more often than 1 in 4.

    python -m jtok_train.evaluation.demo_cloze --data data/demo \\
        --out jtok_train/evaluation/tasks/demo_cloze/demo_cloze.jsonl

Deterministic: the same dataset and settings give the same file.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

from jtok_train.data.tokenizer import load_tokenizer

__all__ = ["held_out_documents", "build_items", "write_items"]

_WORD = re.compile(r"[A-Za-z]")


def held_out_documents(prefix: str, tokenizer_path: str, split: str = "98,2,0") -> list[str]:
    """Texts of the documents Megatron's split gives to validation (document-level split, as GPTDataset)."""
    # lazy: cost (megatron.core, 4-6 s: the script's --help and build_items go without it)
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # lazy: cost (megatron.core, as above)

    tok = load_tokenizer(tokenizer_path)
    ds = IndexedDataset(prefix)
    n = len(ds)
    # the same bounds as BlendedMegatronDatasetBuilder: shares of the document count, rounded
    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[1]
    if bounds is None:
        raise ValueError(f"split={split!r} gives validation no documents: demo_cloze is built from them")
    start, end = int(round(bounds[0] * float(n))), int(round(bounds[1] * float(n)))
    docs = []
    for i in range(start, end):
        ids = [int(t) for t in ds[i] if int(t) != tok.eod]
        docs.append(tok.decode(ids))
    return docs


def _ok_span(words: list[str]) -> bool:
    """A span a reader could judge: at least half its words contain a letter, and no URL (addresses are
    not language, and the corpus's links would be shipped as task text)."""
    return sum(bool(_WORD.search(w)) for w in words) * 2 >= len(words) and not any("://" in w for w in words)


def build_items(docs: list[str], num_items: int = 250, context_words: int = 30, answer_words: int = 6,
                num_choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Cloze items {id, context, choices, label} from held-out documents (see module doc)."""
    rng = random.Random(seed)
    words = [d.split() for d in docs]
    need = context_words + answer_words
    usable = [i for i, w in enumerate(words) if len(w) >= need]
    if len({i for i in usable}) < num_choices:
        raise ValueError(f"only {len(usable)} held-out documents have {need} words; demo_cloze needs at least "
                         f"{num_choices}: use a dataset with more documents")
    # passages: windows every need/2 words of every usable document (half-overlapping: the held-out part is
    # small, and no item is trained on anyway), round-robin over documents
    per_doc = {i: [s for s in range(0, len(words[i]) - need + 1, max(1, need // 2))] for i in usable}
    for starts in per_doc.values():
        rng.shuffle(starts)
    passages: list[tuple[int, int]] = []
    while any(per_doc.values()):
        for i in usable:
            if per_doc[i]:
                passages.append((i, per_doc[i].pop()))
    rng.shuffle(passages)
    items: list[dict[str, Any]] = []
    for doc, s in passages:
        ctx = words[doc][s: s + context_words]
        answer = words[doc][s + context_words: s + need]
        if not (_ok_span(ctx) and _ok_span(answer)):
            continue
        wrong: list[list[str]] = []
        for _ in range(50):
            if len(wrong) == num_choices - 1:
                break
            d2, s2 = passages[rng.randrange(len(passages))]
            span = words[d2][s2 + context_words: s2 + need]
            if d2 != doc and _ok_span(span) and span != answer and span not in wrong:
                wrong.append(span)
        if len(wrong) < num_choices - 1:
            continue
        label = rng.randrange(num_choices)
        choices = [" ".join(w) for w in wrong]
        choices.insert(label, " ".join(answer))
        items.append({"id": len(items), "context": " ".join(ctx), "choices": choices, "label": label})
        if len(items) == num_items:
            break
    if len(items) < num_items:
        raise ValueError(f"the held-out documents gave {len(items)} items, fewer than num_items={num_items}: lower "
                         "--num-items or use a dataset with more documents")
    return items


def write_items(items: list[dict[str, Any]], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset directory built by jtok-data (text_document + tokenizer.json)")
    ap.add_argument("--out", required=True, help="output .jsonl")
    ap.add_argument("--split", default="98,2,0", help="the training run's data.split")
    ap.add_argument("--num-items", type=int, default=250)
    ap.add_argument("--context-words", type=int, default=30)
    ap.add_argument("--answer-words", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    data = Path(a.data)
    docs = held_out_documents(str(data / "text_document"), str(data / "tokenizer.json"), a.split)
    items = build_items(docs, a.num_items, a.context_words, a.answer_words, seed=a.seed)
    path = write_items(items, a.out)
    print(f"{path}: {len(items)} items from {len(docs)} held-out documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
