"""Shared fixtures: a small real-text dataset (a slice of the Python docs, else stdlib sources)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton reads TRITON_INTERPRET when it is first imported, and a test module that imports Megatron at collection
# imports Triton with it: without a GPU the whole run is under Triton's interpreter, set before anything imports
# it (the kernels' tests need it; the kernels' auto backend runs the PyTorch references on CPU tensors either way)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def _real_text_files(n: int) -> list[Path]:
    if PY_DOCS.is_dir():
        files = sorted(PY_DOCS.rglob("*.rst.txt"))
    else:  # the interpreter's own standard library: real text on every machine
        files = sorted(Path(shutil.__file__).parent.glob("*.py"))
    files = [f for f in files if f.stat().st_size > 2000]
    return files[:: max(1, len(files) // n)][:n]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> dict:
    """{prefix, tokenizer, vocab_size}: ~40 real documents, BPE vocab 512."""
    from jtok_train.data.build import build_dataset

    root = tmp_path_factory.mktemp("corpus")
    for i, f in enumerate(_real_text_files(40)):
        (root / f"{i:03d}_{f.name}.txt").write_text(f.read_text(errors="replace"))
    out = tmp_path_factory.mktemp("data")
    res = build_dataset(str(root), out, vocab_size=512, log=lambda *a, **k: None)
    return {"prefix": str(out / "text_document"), "tokenizer": str(out / "tokenizer.json"), "vocab_size": 512}


def tiny_overrides(data: dict, run_dir: str, dense: bool = False, jtok: str = "jtokm", **extra) -> list[str]:
    """Overrides for a ~1M-parameter model that trains in a second per step on one core."""
    o = [
        f"model={'tiny_dense' if dense else 'tiny'}",
        f"jtok={jtok}",
        "model.hidden_size=64",
        "model.num_layers=2",
        "model.ffn_hidden_size=128",
        "model.vocab_size=512",
        "model.seq_length=64",
        f"data.prefixes=[{data['prefix']}]",
        f"data.tokenizer={data['tokenizer']}",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.train_iters=3",
        "train.eval_samples=8",
        "train.lr=1e-3",
        "train.min_lr=1e-4",
        "train.progress=false",
        "train.save=false",
        "logging.wandb=false",
        f"train.run_dir={run_dir}",
    ]
    if not dense:
        o += ["model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_shared_expert_intermediate_size=64",
              "model.moe_router_load_balancing_type=seq_aux_loss"]
    o += [f"{k}={v}" for k, v in extra.items()]
    return o
