"""``jtok-data``: build the training data (corpus -> tokenizer -> Megatron indexed dataset) and inspect it.

Examples::

    jtok-data build --source python-docs --out data/demo --vocab-size 4096
    jtok-data build --source my_texts/ --out data/mine --tokenizer data/demo/tokenizer.json
    jtok-data stats data/demo/text_document --window 2048
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

EPILOG = """\
sources:
  python-docs        the Python 3.11 documentation sources (apt-get install -y python3.11-doc)
  DIR                every *.txt, *.md, *.rst file under DIR (or --pattern GLOB), sorted by path
  FILE.jsonl         one document per line, taken from its "text" field

outputs (in --out DIR):
  tokenizer.json, text_document.bin/.idx (the prefix to train on: DIR/text_document), manifest.json

examples:
  jtok-data build --source python-docs --out data/demo --vocab-size 4096
  jtok-data build --source more_texts/ --out data/more --tokenizer data/demo/tokenizer.json
  jtok-data stats data/demo/text_document
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jtok-data",
        description="Build and inspect jtok-train datasets (Megatron .bin/.idx with a byte-level BPE tokenizer).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,stats}")

    b = sub.add_parser(
        "build",
        help="corpus -> tokenizer -> indexed dataset (skipped when already up to date)",
        description="Read a corpus, train a byte-level BPE tokenizer (or reuse one), and write a Megatron indexed "
        "dataset with one document per entry and <|endoftext|> appended. Idempotent: a manifest with a "
        "fingerprint of the inputs and settings makes a repeated build a no-op.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--source", required=True, help="python-docs | DIR | FILE.jsonl")
    b.add_argument("--out", required=True, help="output directory (created)")
    b.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size incl. EOD (default 4096)")
    b.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a BPE merge (default 2)")
    b.add_argument("--pattern", default=None,
                   help="glob under a directory source (default: *.txt/*.md/*.rst; python-docs: **/*.rst.txt)")
    b.add_argument("--max-doc-chars", type=int, default=16384,
                   help="split files longer than this on top-level section headings; 0 = never split "
                   "(default 16384)")
    b.add_argument("--tokenizer", default=None,
                   help="reuse this tokenizer.json instead of training (datasets blended together must share one)")
    b.add_argument("--force", action="store_true", help="rebuild even when the manifest says up to date")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")

    s = sub.add_parser(
        "stats",
        help="documents, tokens and unique/total ids per window of a dataset",
        description="Print the document and token counts of a dataset prefix and the ratio of unique to total "
        "token ids per non-overlapping window of the concatenated token stream (what JTok's dedup saves).",
    )
    s.add_argument("prefix", help="dataset prefix, e.g. data/demo/text_document (or the data directory)")
    s.add_argument("--window", type=int, action="append",
                   help="window size in tokens (repeatable; default 2048)")
    s.add_argument("--json", action="store_true", help="print JSON")
    return p


def _cmd_build(a: argparse.Namespace) -> int:
    from jtok_train.data.build import build_dataset

    log = (lambda *_: None) if a.json else (lambda msg: print(msg, flush=True))
    r = build_dataset(
        a.source, a.out, vocab_size=a.vocab_size, pattern=a.pattern,
        max_doc_chars=a.max_doc_chars or None, min_frequency=a.min_frequency,
        tokenizer_path=a.tokenizer, force=a.force, log=log,
    )
    if a.json:
        print(json.dumps(dict(r), indent=2))
        return 0
    sec = r.get("seconds", {})
    print(f"prefix      {r.prefix}")
    print(f"documents   {r['documents']:,}")
    print(f"tokens      {r['tokens']:,}  ({r['characters'] / max(r['tokens'], 1):.2f} chars/token, "
          f"dtype {r['dtype']})")
    print(f"vocab       {r['vocab_size']:,}  (eod id {r['eod']})")
    if r["skipped"]:
        print("status      up to date (built earlier in "
              f"{sec.get('total', float('nan')):.1f} s)")
    else:
        print(f"time        {sec['total']:.1f} s  (read {sec['read']:.1f}, tokenizer {sec['tokenizer']:.1f}, "
              f"encode+write {sec['encode_write']:.1f})")
    return 0


def _cmd_stats(a: argparse.Namespace) -> int:
    import os

    from jtok_train.data.build import PREFIX_NAME, dataset_stats

    prefix = a.prefix
    if os.path.isdir(prefix):
        prefix = os.path.join(prefix, PREFIX_NAME)
    windows = a.window or [2048]
    all_stats = [dataset_stats(prefix, w) for w in windows]
    if a.json:
        print(json.dumps(all_stats if len(all_stats) > 1 else all_stats[0], indent=2))
        return 0
    s0 = all_stats[0]
    tpd = s0["tokens_per_document"]
    print(f"prefix      {s0['prefix']}")
    print(f"documents   {s0['documents']:,}")
    print(f"tokens      {s0['tokens']:,}  (dtype {s0['dtype']}, {s0['distinct_ids']:,} distinct ids)")
    print(f"tokens/doc  mean {tpd['mean']:.0f}, median {tpd['median']:.0f}, max {tpd['max']:,}")
    for s in all_stats:
        if "unique_ratio" in s:
            u = s["unique_ratio"]
            print(f"unique/total ids per {s['window']}-token window ({s['windows']} windows): mean {u['mean']:.3f}, "
                  f"p5 {u['p5']:.3f}, p50 {u['p50']:.3f}, p95 {u['p95']:.3f}")
        else:
            print(f"unique/total ids per {s['window']}-token window: dataset shorter than one window")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    a = _parser().parse_args(argv)
    # megatron.core's import warns that the GPU-only fused kernels are absent: irrelevant to building data
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from jtok_train.data.corpus import CorpusError
    from jtok_train.data.indexed import DataFileError

    try:
        if a.command == "build":
            return _cmd_build(a)
        return _cmd_stats(a)
    except (CorpusError, DataFileError, FileNotFoundError, ValueError) as e:
        print(f"jtok-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
