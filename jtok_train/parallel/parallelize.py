"""Embedding parallelism, applied to a built model (torchtitan's model / parallelize split).

``jtok_train.model`` builds a plain model whose JTok tables are replicated. With ``parallel.embedding=sharded``
the model is built with its replicated tables on the meta device (nothing allocated: the whole [V, L, n_e, d]
table may not fit on one device) and ``shard_token_tables`` then creates the embedding-parallel process group
and puts the row-sharded provider of each model chunk in its place. Backbone parallelism (TP, PP, EP, DP) is
Megatron's, set up by its parallel state before the build and by its DDP after it.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state as ps

from jtok_train.config import RunConfig
from jtok_train.model.builder import build_model_chunks, pipeline_stage_layers
from jtok_train.parallel.groups import embedding_parallel_group, embedding_parallel_host_group
from jtok_train.tables.sharded import ShardedTokenTable

__all__ = ["shards_tables", "sharded_token_table", "shard_token_tables", "build_parallel_model_chunks"]


def shards_tables(cfg: RunConfig) -> bool:
    """Whether ``cfg`` row-shards the JTok tables over the ranks of each pipeline stage."""
    return cfg.jtok.variant != "none" and cfg.parallel.embedding == "sharded"


def sharded_token_table(cfg: RunConfig, device: torch.device | str, vp_stage: int | None = None,
                        hot_ids: Any = None) -> ShardedTokenTable:
    """The row-sharded provider of this rank's pipeline stage (its model chunk ``vp_stage``), over the
    embedding-parallel group (the stage's ranks; collective: every rank calls it). ``hot_ids``: the token ids
    whose rows every rank replicates (``parallel.hot_rows``; the caller reads them from the data)."""
    j, m, p = cfg.jtok, cfg.model, cfg.parallel
    layers = pipeline_stage_layers(cfg, device, vp_stage)
    tp = ps.get_tensor_model_parallel_world_size()
    return ShardedTokenTable(
        vocab_size=m.vocab_size,
        num_layers=layers.count,
        layers=layers,
        pipeline_group=ps.get_pipeline_model_parallel_group() if layers.num_stages > 1 else None,
        num_sets=j.num_sets,
        hidden_size=m.hidden_size,
        group=embedding_parallel_group(),
        id_group=embedding_parallel_host_group(),
        seed=j.table_seed,
        init_std=j.table_init_std,
        dedup=p.dedup,
        overlap=p.overlap,
        grad_scale=1.0 / ps.get_data_parallel_world_size(),
        sequence_shard=(ps.get_tensor_model_parallel_rank(), tp) if p.sequence_parallel and tp > 1 else None,
        device=device,
        hot_ids=hot_ids,
    )


def shard_token_tables(chunks: list, cfg: RunConfig, device: torch.device | str, hot_ids: Any = None) -> list:
    """Put the row-sharded provider in place of each model chunk's replicated table (in place; returns
    ``chunks``). A no-op unless ``cfg`` shards the tables."""
    if not shards_tables(cfg):
        return chunks
    for v, model in enumerate(chunks):
        model.token_table = sharded_token_table(cfg, device, vp_stage=v if len(chunks) > 1 else None,
                                                hot_ids=hot_ids)
    return chunks


def build_parallel_model_chunks(cfg: RunConfig, config: Any, device: torch.device | str, use_te: bool | None = None,
                                hot_ids: Any = None) -> list:
    """This rank's model chunks with the configured embedding parallelism: what training builds."""
    sharded = shards_tables(cfg)
    chunks = build_model_chunks(cfg, config, use_te, table_device="meta" if sharded else None)
    return shard_token_tables(chunks, cfg, device, hot_ids)
