"""``jtok-data``: build the training data (corpus -> tokenizer -> Megatron indexed dataset) and inspect it.

Examples::

    jtok-data build --source python-docs --out data/demo --vocab-size 4096
    jtok-data build --source my_texts/ --out data/mine --tokenizer data/demo/tokenizer.json
    jtok-data stats data/demo/text_document --window 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

from jtok_train.data.corpus import CorpusError

EPILOG = """\
sources (--source, repeatable: the documents of all of them, in the order given):
  python-docs              the Python 3.11 documentation sources (apt-get install -y python3.11-doc)
  FILE.parquet             one document per row, from the --text-field column (default "text")
  FILE.jsonl[.gz|.zst]     one document per line, from its --text-field field
  'GLOB'                   e.g. 'shards/*.parquet' or 'dumps/**/*.jsonl.gz' (quoted), sorted by path
  DIR                      a datasets.save_to_disk directory (state.json); else its *.parquet files;
                           else its *.jsonl[.gz|.zst] files; else every *.txt, *.md, *.rst (or --pattern)
  KIND:PATH                force the kind of a directory or glob: parquet:, jsonl:, text:, hf:

tokenizer:
  without --tokenizer a byte-level BPE of --vocab-size ids is trained on the corpus;
  --tokenizer FILE|DIR     any Hugging Face tokenizer.json (e.g. Qwen2's), or a directory holding one;
                           end of document: --eod-token, else tokenizer_config.json's eos_token, else
                           <|endoftext|>, <|end_of_text|>, </s> or <eos>. The build prints the model
                           vocabulary to use (the tokenizer's, padded to a multiple of 128 like Megatron).

outputs (in --out DIR):
  tokenizer.json, text_document.bin/.idx (the prefix to train on: DIR/text_document), manifest.json;
  with --shard-tokens N: text_document_00000.bin/.idx, _00001, ... (list them all in data.prefixes)

interrupted builds (killed, or stopped by a bad input file) keep their finished parts: run the same
command again to resume; the output is the same as an uninterrupted build, whatever --workers.

examples:
  jtok-data build --source python-docs --out data/demo --vocab-size 4096
  jtok-data build --source more_texts/ --out data/more --tokenizer data/demo/tokenizer.json
  jtok-data build --source 'fw/*.parquet' --source extra.jsonl.zst --tokenizer qwen2/ --workers 8 --out data/fw
  jtok-data stats data/demo/text_document
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jtok-data",
        description="Build, inspect and blend jtok-train datasets (Megatron .bin/.idx).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,stats,blend}")

    b = sub.add_parser(
        "build",
        help="corpus -> tokenizer -> indexed dataset (skipped when already up to date)",
        description="Stream one or more corpora, train a byte-level BPE tokenizer (or use a given Hugging Face "
        "tokenizer), and write a Megatron indexed dataset with one document per entry and the end-of-document id "
        "appended, tokenized in --workers processes (same bytes for any number). Idempotent: a manifest with a "
        "fingerprint of the inputs and settings makes a repeated build a no-op; an interrupted build resumes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--source", required=True, action="append",
                   help="python-docs | DIR | FILE.parquet | FILE.jsonl[.gz|.zst] | 'GLOB' | KIND:PATH; repeatable")
    b.add_argument("--text-field", default="text", help="column / JSON field holding the text (default: text)")
    b.add_argument("--out", required=True, help="output directory (created)")
    b.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size incl. EOD (default 4096)")
    b.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a BPE merge (default 2)")
    b.add_argument("--pattern", default=None,
                   help="glob under a directory source (default: *.txt/*.md/*.rst; python-docs: **/*.rst.txt)")
    b.add_argument("--max-doc-chars", type=int, default=16384,
                   help="split files longer than this on top-level section headings; 0 = never split "
                   "(default 16384)")
    b.add_argument("--tokenizer", default=None,
                   help="use this tokenizer.json (any Hugging Face tokenizer, or a directory holding one) instead of "
                   "training one (datasets blended together must share one)")
    b.add_argument("--eod-token", default=None,
                   help="end-of-document token of --tokenizer (default: its tokenizer_config.json eos_token, else "
                   "<|endoftext|>, <|end_of_text|>, </s> or <eos>)")
    b.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (default 1; the output is the same for any number)")
    b.add_argument("--shard-tokens", type=int, default=0,
                   help="write shards of at least this many tokens (text_document_00000, ...); 0 = one file "
                   "(default)")
    b.add_argument("--part-tokens", type=int, default=None,
                   help="one output file: tokens between resume points (default 33554432)")
    b.add_argument("--chunk-docs", type=int, default=None,
                   help="documents per unit of work sent to a worker (default 256)")
    b.add_argument("--model-vocab-size", type=int, default=None,
                   help="fail unless the tokenizer fits a model with this vocabulary (model.vocab_size)")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar with documents/s and tokens/s (default: when stderr is a terminal)")
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
    s.add_argument("--count-ids", action="store_true",
                   help="write PREFIX.counts.npy (how often each token id occurs: parallel.hot_rows reads it) and "
                   "print the share of tokens the most frequent ids cover")

    bl = sub.add_parser(
        "blend",
        help="print data.prefixes / data.weights for a blend of built datasets (shards expanded)",
        description="Read the manifest of each built dataset directory and print a data config blending them by "
        "the given weights: a dataset built with --shard-tokens contributes one prefix per shard, its weight "
        "shared among them by tokens. Paste the output into a data/*.yaml of your config directory (or pass "
        "--out DIR/data/NAME.yaml), then: jtok-train --config-dir DIR data=NAME.",
    )
    bl.add_argument("members", nargs="+", metavar="DIR:WEIGHT", help="a dataset directory and its weight")
    bl.add_argument("--out", default=None, help="write the YAML here instead of printing it")
    return p


def _cmd_build(a: argparse.Namespace) -> int:
    # lazy: cost (numpy via jtok_train.data.build, 0.2-0.6 s: --help answers without it)
    from jtok_train.data.build import DEFAULT_CHUNK_DOCS, DEFAULT_PART_TOKENS, build_dataset

    log = (lambda *_: None) if a.json else (lambda msg: print(msg, flush=True))
    progress = a.progress if a.progress is not None else sys.stderr.isatty()
    r = build_dataset(
        a.source, a.out, vocab_size=a.vocab_size, pattern=a.pattern,
        max_doc_chars=a.max_doc_chars or None, min_frequency=a.min_frequency,
        tokenizer_path=a.tokenizer, force=a.force, log=log, text_field=a.text_field, eod_token=a.eod_token,
        workers=a.workers, shard_tokens=a.shard_tokens, part_tokens=a.part_tokens or DEFAULT_PART_TOKENS,
        chunk_docs=a.chunk_docs or DEFAULT_CHUNK_DOCS, model_vocab_size=a.model_vocab_size, progress=progress,
    )
    if a.json:
        print(json.dumps(dict(r), indent=2))
        return 0
    sec = r.get("seconds", {})
    if len(r.prefixes) == 1:
        print(f"prefix      {r.prefix}")
    else:
        print(f"prefixes    {len(r.prefixes)} shards: data.prefixes=[{','.join(r.prefixes)}]")
    print(f"documents   {r['documents']:,}")
    print(f"tokens      {r['tokens']:,}  ({r['characters'] / max(r['tokens'], 1):.2f} chars/token, "
          f"dtype {r['dtype']})")
    print(f"vocab       {r['vocab_size']:,}  (eod id {r['eod']}); model.vocab_size >= {r['vocab_size']}, "
          f"Megatron-padded: {r.get('padded_vocab_size', r['vocab_size'])}")
    if r["skipped"]:
        print("status      up to date (built earlier in "
              f"{sec.get('total', float('nan')):.1f} s)")
    else:
        rate = r["tokens"] / max(sec.get("encode_write", 0.0), 1e-9)
        resumed = f", resumed after {r['resumed_parts']} part(s)" if r.get("resumed_parts") else ""
        print(f"time        {sec['total']:.1f} s  (tokenizer {sec['tokenizer']:.1f}, encode+write "
              f"{sec['encode_write']:.1f} = {rate:,.0f} tokens/s with {r['workers']} worker(s), merge "
              f"{sec['merge']:.1f}{resumed})")
    return 0


def _cmd_stats(a: argparse.Namespace) -> int:
    from jtok_train.data.build import PREFIX_NAME, dataset_stats  # lazy: cost (numpy, 0.2-0.6 s: not for --help)

    prefix = a.prefix
    if os.path.isdir(prefix):
        manifest = os.path.join(prefix, "manifest.json")
        with open(manifest) if os.path.isfile(manifest) else open(os.devnull) as f:
            shards = (json.loads(f.read() or "{}").get("prefixes") or [])
        if len(shards) > 1:
            raise ValueError(f"{prefix} holds {len(shards)} shards: pass one of them, e.g. "
                             f"jtok-data stats {os.path.join(prefix, shards[0])}")
        prefix = os.path.join(prefix, PREFIX_NAME)
    windows = a.window or [2048]
    all_stats = [dataset_stats(prefix, w) for w in windows]
    if a.count_ids:
        import numpy as np  # lazy: cost (numpy, 0.2-0.6 s: not for --help)

        from jtok_train.data.counts import write_token_counts  # lazy: cost (numpy, as above)

        counts = np.load(write_token_counts(prefix))
        top = np.sort(counts)[::-1].cumsum() / max(1, counts.sum())
        all_stats[0]["hot_rows_token_share"] = {str(h): float(top[min(h, len(top)) - 1])
                                                for h in (256, 1024, 4096) if len(top)}
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
    if "hot_rows_token_share" in s0:
        share = ", ".join(f"top {h}: {v:.3f}" for h, v in s0["hot_rows_token_share"].items())
        print(f"token counts written to {prefix}.counts.npy; share of tokens of the most frequent ids: {share}")
    return 0


def _cmd_blend(a: argparse.Namespace) -> int:
    from jtok_train.data.build import blend_config  # lazy: cost (numpy, 0.2-0.6 s: not for --help)

    members = []
    for m in a.members:
        path, sep, w = m.rpartition(":")
        if not sep or not path:
            raise ValueError(f"blend member {m!r}: write DIR:WEIGHT, e.g. data/web:0.3")
        members.append((path, float(w)))
    text = blend_config(members)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)
        print(f"wrote {a.out}")
    else:
        print(text, end="")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    a = _parser().parse_args(argv)
    # megatron.core's import warns that the GPU-only fused kernels are absent: irrelevant to building data
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from jtok_train.data.indexed import DataFileError  # lazy: cost (numpy, 0.2-0.6 s: not for --help)

    try:
        if a.command == "build":
            return _cmd_build(a)
        if a.command == "blend":
            return _cmd_blend(a)
        return _cmd_stats(a)
    except (CorpusError, DataFileError, FileNotFoundError, ValueError) as e:
        print(f"jtok-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
