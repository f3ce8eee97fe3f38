"""Data pipeline benchmark: tokens/s per worker, the 1 -> 2 worker scaling, and peak memory against corpus size.

    .venv/bin/python benchmarks/data_bench.py [--repeats 3] [--out benchmarks/results/data.json]

Corpus: the Python 3.11 documentation sources (python3.11-doc; else the standard library's sources), one document
per paragraph, written as parquet shards of 2,000 rows (row groups of 500); tokenizer: a byte-level BPE of 8,192
ids trained on it (`jtok-data build`). Every build is a fresh `jtok-data build` process (`--force`):

- scaling: 1 and 2 workers, interleaved (1, 2, 1, 2, ...) so both see the same background load; tokens/s is the
  manifest's encode+write time (reading, tokenizing, writing; not the interpreter start or the imports); tokens per
  CPU-second of the tokenizing processes (the manifest's CPU times) do not depend on the machine's load;
- memory: the same build over a quarter of the corpus and over 10 copies of that quarter, 1 worker, also
  interleaved: peak RSS of the build process sampled every 20 ms, the RSS after its imports (torch, megatron,
  pyarrow, tokenizers: the baseline), and ``ru_maxrss`` (which Linux starts at the forking parent's high-water
  mark, here this script's, so it can hide the build's own peak).
Figures are medians over ``--repeats``; ratios are between medians of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
PEAK = """
import resource, sys, threading, time
import psutil
import pyarrow.parquet, tokenizers  # noqa: F401  the imports first: their memory is the baseline
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401
from jtok_train.cli.data import main
proc, peak, done = psutil.Process(), [0], threading.Event()
base = proc.memory_info().rss
def sample():  # the build's own peak: ru_maxrss alone can be set by an import-time transient
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
t = threading.Thread(target=sample, daemon=True)
t.start()
rc = main(sys.argv[1:])
done.set(); t.join()
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "BASE", base, "SAMPLED", peak[0])
sys.exit(rc)
"""


def _paragraphs() -> list[str]:
    from jtok_train.data.corpus import CorpusError, find_python_docs

    try:
        files = sorted(find_python_docs().rglob("*.rst.txt"))
    except CorpusError:
        files = sorted(Path(os.__file__).parent.glob("*.py"))
    out = []
    for f in files:
        out += [p for p in f.read_text(errors="replace").split("\n\n") if p.strip()]
    return out


def _write_shards(d: Path, docs: list[str], copies: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True)
    rows = [t for _ in range(copies) for t in docs]
    for i in range(0, len(rows), 2000):
        pq.write_table(pa.table({"text": rows[i:i + 2000]}), d / f"shard_{i // 2000:05d}.parquet", row_group_size=500)
    return sum(len(t) for t in rows)


def _build(src: Path, out: Path, tok: Path, workers: int) -> dict:
    cmd = [sys.executable, "-c", PEAK, "build", "--source", str(src), "--tokenizer", str(tok), "--out", str(out),
           "--workers", str(workers), "--force", "--json", "--no-progress"]
    p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    body, _, peak = p.stdout.rpartition("PEAK_KB")
    m = json.loads(body)
    maxrss_kb, _, base, _, sampled = peak.split()
    cpu = m["cpu_seconds"]
    return {"tokens": m["tokens"], "documents": m["documents"], "encode_s": m["seconds"]["encode_write"],
            "tokens_per_s": m["tokens"] / m["seconds"]["encode_write"],
            "cpu_main_s": cpu["main"], "cpu_workers_s": cpu["workers"],
            # tokens per CPU-second of whoever tokenizes: the main process with 1 worker, the workers otherwise
            "tokens_per_cpu_s": m["tokens"] / (cpu["workers"] if workers > 1 else cpu["main"]),
            "maxrss_mb": int(maxrss_kb) / 1024,
            "base_rss_mb": int(base) / 2**20, "peak_rss_mb": int(sampled) / 2**20,
            "build_rss_mb": (int(sampled) - int(base)) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data.json"))
    a = ap.parse_args()
    docs = _paragraphs()
    with tempfile.TemporaryDirectory(prefix="jtok_data_bench_") as tmp:
        tmp = Path(tmp)
        chars_full = _write_shards(tmp / "full", docs, 1)
        quarter = docs[: len(docs) // 4]
        chars1 = _write_shards(tmp / "x1", quarter, 1)
        chars10 = _write_shards(tmp / "x10", quarter, 10)
        from jtok_train.data.build import build_dataset

        t0 = time.perf_counter()
        build_dataset(str(tmp / "full"), tmp / "tok", vocab_size=8192, log=lambda *_: None)
        print(f"tokenizer trained in {time.perf_counter() - t0:.1f} s", flush=True)
        tok = tmp / "tok" / "tokenizer.json"
        runs: dict[str, list[dict]] = {"w1": [], "w2": [], "mem_x1": [], "mem_x10": []}
        for r in range(a.repeats):
            for w in (1, 2):
                runs[f"w{w}"].append(_build(tmp / "full", tmp / f"o_w{w}", tok, w))
                x = runs[f"w{w}"][-1]
                print(f"repeat {r}: {w} worker(s) {x['tokens_per_s']:,.0f} tokens/s, "
                      f"{x['tokens_per_cpu_s']:,.0f} tokens per tokenizing CPU-second (main {x['cpu_main_s']:.1f} s, "
                      f"workers {x['cpu_workers_s']:.1f} s "
                      f"CPU; load {os.getloadavg()[0]:.1f})", flush=True)
            for name in ("x1", "x10"):
                runs[f"mem_{name}"].append(_build(tmp / name, tmp / f"o_{name}", tok, 1))
                x = runs[f"mem_{name}"][-1]
                print(f"repeat {r}: corpus {name}: peak {x['peak_rss_mb']:.0f} MB ({x['build_rss_mb']:.0f} MB above "
                      f"the imports; ru_maxrss {x['maxrss_mb']:.0f} MB)", flush=True)

    def med(key: str, field: str) -> float:
        return statistics.median(x[field] for x in runs[key])

    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "repeats": a.repeats,
        "corpus": {"documents": runs["w1"][0]["documents"], "tokens": runs["w1"][0]["tokens"], "chars": chars_full},
        "memory_corpus": {"documents_x1": runs["mem_x1"][0]["documents"], "chars_x1": chars1,
                          "documents_x10": runs["mem_x10"][0]["documents"], "chars_x10": chars10},
        "tokens_per_s": {"w1": med("w1", "tokens_per_s"), "w2": med("w2", "tokens_per_s")},
        "tokens_per_s_per_worker": {"w1": med("w1", "tokens_per_s"), "w2": med("w2", "tokens_per_s") / 2},
        "scaling_1_to_2": med("w2", "tokens_per_s") / med("w1", "tokens_per_s"),
        "scaling_1_to_2_per_repeat": [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs["w1"], runs["w2"])],
        "tokens_per_cpu_s": {"w1": med("w1", "tokens_per_cpu_s"), "w2_workers": med("w2", "tokens_per_cpu_s")},
        "main_cpu_s_w2": med("w2", "cpu_main_s"),
        "load_average_1min": os.getloadavg()[0],
        "peak_rss_mb": {"x1": med("mem_x1", "peak_rss_mb"), "x10": med("mem_x10", "peak_rss_mb")},
        "peak_ratio_x10_over_x1": med("mem_x10", "peak_rss_mb") / med("mem_x1", "peak_rss_mb"),
        "maxrss_mb": {"x1": med("mem_x1", "maxrss_mb"), "x10": med("mem_x10", "maxrss_mb")},
        "rss_above_imports_mb": {"x1": med("mem_x1", "build_rss_mb"), "x10": med("mem_x10", "build_rss_mb")},
        "runs": runs,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
