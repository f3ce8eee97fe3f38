"""build_datasets on 2 real gloo ranks: the collective build (rank 0 first, cache, barrier) and the batch order.

Each rank builds the datasets itself (one shared, empty cache dir: rank 0 writes the indices, rank 1 reads
them), takes its micro-batches of two steps by ``microbatch_indices``, and returns their tokens. Ordered by
(step, micro-step, rank) they must equal the global batches a single process reads.
"""

from __future__ import annotations

import pytest

from jtok_train.testing import run_distributed

pytestmark = pytest.mark.distributed

G, M, STEPS, SEQ = 8, 2, 2, 32


def _rank_batches(prefix: str, tok_path: str, cache_dir: str) -> dict:
    import torch.distributed as dist

    from jtok_train.data.datasets import build_datasets, get_microbatch, microbatch_indices, num_microbatches
    from jtok_train.data.tokenizer import load_tokenizer

    rank, world = dist.get_rank(), dist.get_world_size()
    tr, va = build_datasets([(prefix, 0.6), (prefix, 0.4)], load_tokenizer(tok_path), seq_length=SEQ, seed=5,
                            train_samples=G * STEPS, valid_samples=G, split="90,10", cache_dir=cache_dir)
    assert dist.is_initialized()  # the caller's group is left alone
    n = num_microbatches(G, M, world)
    out = [[get_microbatch(tr, microbatch_indices(s, k, rank, world, M, G))["tokens"].tolist()
            for k in range(n)] for s in range(STEPS)]
    return {"rank": rank, "len": len(tr), "valid_len": len(va), "batches": out}


def test_two_ranks_build_and_read_the_global_order(small_dataset, tmp_path):
    from jtok_train.data.datasets import build_datasets, get_microbatch, global_batch_indices
    from jtok_train.data.tokenizer import load_tokenizer

    res = run_distributed(_rank_batches, 2, small_dataset["prefix"], small_dataset["tokenizer"],
                          str(tmp_path / "cache_w2"), timeout=240)
    # reference: one process, its own private group, a separate cache (a genuine rebuild)
    tr, _ = build_datasets([(small_dataset["prefix"], 0.6), (small_dataset["prefix"], 0.4)],
                           load_tokenizer(small_dataset["tokenizer"]), seq_length=SEQ, seed=5,
                           train_samples=G * STEPS, valid_samples=G, split="90,10",
                           cache_dir=str(tmp_path / "cache_w1"))
    assert res[0]["len"] == res[1]["len"] == len(tr)
    assert res[0]["valid_len"] == res[1]["valid_len"] > 0
    n = G // (M * 2)
    for s in range(STEPS):
        merged = [row for k in range(n) for r in range(2) for row in res[r]["batches"][s][k]]
        want = get_microbatch(tr, global_batch_indices(s, G))["tokens"].tolist()
        assert merged == want
