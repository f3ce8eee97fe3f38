"""The dedup ratio and remote share measured on a dataset's micro-batches (the planner's one measured input).
The one planning module that imports data/ and tables/: it reads the dataset, its tokenizer and the real row placement."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from jtok_train.config import RunConfig
from jtok_train.data.counts import counts_path
from jtok_train.data.datasets import build_datasets, get_microbatch
from jtok_train.data.tokenizer import load_tokenizer
from jtok_train.planning.cluster import PlanError
from jtok_train.planning.exchange import HOT_ROW_CANDIDATES
from jtok_train.planning.layout import layout
from jtok_train.tables.placement import RowPlacement

__all__ = ["measure_dedup"]


def measure_dedup(cfg: RunConfig, prefix: str, world: int, micro_batches: int = 64, tokenizer: Optional[str] = None,
                  train_samples: Optional[int] = None, valid_samples: int = 0) -> dict:
    """unique/total ids per micro-batch and the remote share of the unique ids, on the training micro-batches
    the trainer would read first (Megatron GPTDataset order, this config's seq_length, micro-batch size and seed),
    with the real row placement over ``world`` ranks. Micro-batch j goes to data-parallel rank j mod DP (the
    trainer's order); with TP + sequence parallelism each TP rank asks for its own sequence slice.
    ``train_samples`` / ``valid_samples``: the dataset sizes to build (the trainer's, train_iters x global batch and
    eval_samples, give the trainer's exact sample order; the default builds just enough samples)."""
    lay = layout(cfg, world)
    tok_path = tokenizer or (cfg.data.tokenizer if Path(str(cfg.data.tokenizer)).is_file() else None) \
        or str(Path(prefix).parent / "tokenizer.json")
    if not Path(tok_path).is_file():
        raise PlanError(f"dedup_from={prefix}: no tokenizer at {tok_path}; set data.tokenizer=<the tokenizer.json "
                        "the data was built with>")
    tok = load_tokenizer(tok_path)
    m, s = cfg.train.micro_batch_size, cfg.model.seq_length
    if micro_batches < 1:
        raise PlanError(f"dedup_samples={micro_batches} is invalid: measure at least 1 micro-batch")
    train_ds, _ = build_datasets([prefix], tok, seq_length=s, seed=cfg.train.seed,
                                 train_samples=max(train_samples or 0, micro_batches * m), valid_samples=valid_samples,
                                 split=cfg.data.split, cache_dir=cfg.data.cache_dir)
    placement = RowPlacement(cfg.model.vocab_size, lay.emb_world, cfg.jtok.table_seed)
    tp = lay.tp if lay.sequence_parallel else 1
    ratios, remote, unique, positions, uniques = [], [], [], [], []
    for jmb in range(micro_batches):
        ids = get_microbatch(train_ds, list(range(jmb * m, (jmb + 1) * m)))["tokens"]
        if int(ids.max()) >= cfg.model.vocab_size:
            raise PlanError(f"dedup_from={prefix}: token id {int(ids.max())} >= model.vocab_size={cfg.model.vocab_size}")
        flat = ids.t().reshape(-1).view(s, m)
        dp_rank = jmb % lay.dp
        for t in range(tp):
            part = flat[t * (s // tp):(t + 1) * (s // tp)].reshape(-1)
            u = torch.unique(part)
            requester = dp_rank * lay.tp + (t if tp > 1 else 0)
            owners = placement.owner(u)
            ratios.append(u.numel() / part.numel())
            remote.append(float((owners != requester).float().mean()))
            unique.append(u.numel())
            uniques.append(u.numpy())
            positions.append(part.numel())
    ratios_a = np.array(ratios)
    hot_share = _hot_share(cfg, prefix, [u for u in uniques])
    return {"hot_share": hot_share, "prefix": str(prefix), "micro_batches": micro_batches, "tokens_per_microbatch": m * s // tp,
            "unique_ratio": float(np.sum(unique) / np.sum(positions)), "unique_ratio_p5": float(np.percentile(ratios_a, 5)),
            "unique_ratio_p95": float(np.percentile(ratios_a, 95)),
            "remote_fraction": float(np.dot(remote, unique) / np.sum(unique)), "world": lay.emb_world}



def _hot_share(cfg: RunConfig, prefix: str, uniques: list) -> Optional[dict]:
    """{H: share of the micro-batches' unique ids among the data's H most frequent} for the planner's
    candidates, from the dataset's token counts (``jtok-data stats --count-ids``); None without them."""
    path = counts_path(prefix)
    if not path.is_file():
        return None
    counts = np.load(path)
    rank = np.empty(len(counts), dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
    total = sum(len(u) for u in uniques)
    cands = sorted({h for h in (*HOT_ROW_CANDIDATES, cfg.parallel.hot_rows) if h <= cfg.model.vocab_size})
    return {h: float(sum(int((rank[u] < h).sum()) for u in uniques) / max(total, 1)) for h in cands}
