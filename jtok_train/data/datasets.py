"""Train/valid GPT datasets (Megatron-Core BlendedMegatronDatasetBuilder) and the rank-independent batch order.

Building
--------
:func:`build_datasets` builds ``GPTDataset`` splits (and a ``BlendedDataset`` on top when several prefixes are
blended by weight) with Megatron-Core's builder. The builder is collective: **call it on every rank** (of the
whole world) with the same arguments. Rank 0 builds the document/sample/shuffle indices and writes them to the
cache directory (default ``<dir of the first prefix>/cache``), all ranks meet at a barrier, then the other
ranks load them from the cache. The cache directory must therefore be visible to all ranks (shared file system;
on nodes without one, point ``cache_dir`` at a node-local directory and pre-build once per node).
Megatron needs a torch.distributed process group for this even on one rank: when none is initialised,
:func:`build_datasets` opens a private 1-rank gloo group (file store in a temp dir, no port) for the duration of
the build and destroys it afterwards (:func:`ensure_process_group`).

Sample order
------------
The train dataset is already globally shuffled by Megatron (seeded): sample ``j`` of it is the ``j``-th sample
the run consumes, whatever the world size. A run consumes whole global batches::

    global_batch_size G = micro_batch_size m * num_microbatches n * dp_size W
    global batch of step s = dataset indices [start + s*G, start + (s+1)*G)       (start = consumed offset)

and sample ``i`` (0 <= i < G) of that global batch is processed by

    micro-step  k = i // (m*W)
    DP rank     r = (i % (m*W)) // m
    row         i % m           of that rank's micro-batch

i.e. every micro-step takes the next m*W samples and rank r takes the r-th block of m of them (Megatron's
``MegatronPretrainingSampler`` convention, so ``consumed_samples`` means the same thing as in Megatron).
Ordering the per-rank micro-batches by (micro-step, rank) gives back the global batch for every W, so the set
of samples behind each optimizer step, and their order, does not depend on the number of ranks; resuming at
another world size only needs the global number of consumed samples.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from jtok_train.data.indexed import check_token_range, read_sequence_lengths, validate_indexed

__all__ = [
    "parse_blend",
    "ensure_process_group",
    "build_datasets",
    "global_batch_indices",
    "microbatch_indices",
    "num_microbatches",
    "make_batch",
    "get_microbatch",
]

logger = logging.getLogger(__name__)

BlendSpec = Union[str, os.PathLike, Sequence[Any]]


def parse_blend(paths_and_weights: BlendSpec) -> Tuple[List[str], Optional[List[float]]]:
    """Normalise a blend to Megatron's ``([prefix, ...], [weight, ...] or None)``.

    Accepted: one prefix; a list of prefixes (weights None: proportional to size); a list of
    ``(prefix, weight)`` pairs; Megatron's flat ``[w1, p1, w2, p2, ...]``; or the tuple
    ``([p1, p2], [w1, w2])``. Prefixes may carry a trailing .bin/.idx, which is stripped.
    """
    def strip(p: Any) -> str:
        s = os.fspath(p)
        return s[:-4] if s.endswith((".bin", ".idx")) else s

    x = paths_and_weights
    if isinstance(x, (str, os.PathLike)):
        return [strip(x)], None
    x = list(x)
    if not x:
        raise ValueError("empty data blend: give at least one dataset prefix")
    if (len(x) == 2 and isinstance(x[0], (list, tuple)) and (x[1] is None or isinstance(x[1], (list, tuple)))
            and all(isinstance(p, (str, os.PathLike)) for p in x[0])):
        prefixes, weights = [strip(p) for p in x[0]], (None if x[1] is None else [float(w) for w in x[1]])
    elif all(isinstance(e, (list, tuple)) and len(e) == 2 for e in x):
        prefixes, weights = [strip(p) for p, _ in x], [float(w) for _, w in x]
    elif all(isinstance(e, (str, os.PathLike)) for e in x):
        prefixes, weights = [strip(p) for p in x], None
    elif len(x) % 2 == 0 and all(isinstance(w, (int, float)) for w in x[0::2]):
        prefixes, weights = [strip(p) for p in x[1::2]], [float(w) for w in x[0::2]]
    else:
        raise ValueError(f"cannot read the data blend {paths_and_weights!r}: use [(prefix, weight), ...]")
    if weights is not None:
        if len(weights) != len(prefixes):
            raise ValueError(f"data blend has {len(prefixes)} prefixes but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"data blend weights must be >= 0 with a positive sum, got {weights}")
    return prefixes, weights


@contextlib.contextmanager
def ensure_process_group() -> Iterator[None]:
    """Yield with a torch.distributed process group available.

    If one is already initialised it is used as is; otherwise a private 1-rank gloo group is created
    (file:// store in a temp dir, so no port is taken) and destroyed on exit.
    """
    if dist.is_available() and dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="jtok_pg_") as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def build_datasets(
    paths_and_weights: BlendSpec,
    tokenizer: Any,
    *,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    split: str = "98,2",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    mid_level_dataset_surplus: float = 0.005,
) -> Tuple[torch.utils.data.Dataset, Optional[torch.utils.data.Dataset]]:
    """Build (train_ds, valid_ds) from one or more indexed datasets. Collective: call on every rank.

    Args:
        paths_and_weights: dataset prefix(es) and blend weights, see :func:`parse_blend` (no weights:
            proportional to each dataset's token count). Every prefix is
            split by documents into train/valid per ``split`` (e.g. "98,2"; a third number would be a test
            split, which is not built); the blend of the train parts is the train set, likewise for valid.
        tokenizer: the :class:`~jtok_train.data.tokenizer.Tokenizer` the data was built with (needs
            ``vocab_size``, ``eod``, ``unique_identifiers``).
        seq_length: tokens per sample (each sample reads seq_length + 1 tokens: inputs and shifted labels).
        seed: seeds Megatron's document shuffle, sample shuffle and blend order.
        train_samples / valid_samples: samples to provide (e.g. train_iters * global_batch_size); a dataset
            smaller than that is repeated over epochs, each epoch reshuffled.
        cache_dir: where Megatron caches its index arrays (default ``<dir of first prefix>/cache``).
        eod_mask_loss, reset_position_ids, reset_attention_mask: Megatron's GPTDatasetConfig options.

    Returns:
        (train_ds, valid_ds); valid_ds is None when the split gives validation no documents. Items are dicts
        of tensors ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (no attention mask: causal).
    Raises:
        DataFileError for missing/truncated files or token ids beyond the tokenizer's vocabulary.
    """
    # lazy: cost (megatron.core, 4-6 s: the config check imports this module, via data/dali.py, without it)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # lazy: cost (as above)

    prefixes, weights = parse_blend(paths_and_weights)
    infos = [validate_indexed(p) for p in prefixes]
    for p in prefixes:
        check_token_range(p, tokenizer.vocab_size)
    if weights is None:
        # Proportional to size, but stated explicitly: with weights Megatron sizes every member to the
        # requested sample count (repeating epochs as needed); without, it caps the split at one epoch.
        weights = [float(max(i.num_tokens, 1)) for i in infos]
    if weights is not None:
        # Drop zero-weight members: Megatron would still build (and cache) them.
        keep = [i for i, w in enumerate(weights) if w > 0]
        prefixes, weights = [prefixes[i] for i in keep], [weights[i] for i in keep]
    if seq_length < 1 or train_samples < 1 or valid_samples < 0:
        raise ValueError(f"need seq_length >= 1, train_samples >= 1, valid_samples >= 0 "
                         f"(got {seq_length}, {train_samples}, {valid_samples})")
    _check_split_not_empty(prefixes, split)
    cache = Path(cache_dir) if cache_dir is not None else Path(prefixes[0]).resolve().parent / "cache"

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=str(cache),
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=mid_level_dataset_surplus,
        num_dataset_builder_threads=1,
    )
    with ensure_process_group():
        train_ds, valid_ds, _test = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
        ).build()
    if train_ds is None or len(train_ds) == 0:
        raise ValueError(f"the train split of {prefixes} is empty (split={split!r}): need more documents")
    if len(train_ds) < train_samples:  # Megatron sizes with weights; this guards its contract
        raise ValueError(f"built {len(train_ds)} train samples, fewer than the {train_samples} requested")
    if valid_ds is not None and len(valid_ds) == 0:
        valid_ds = None
    return train_ds, valid_ds


def _check_split_not_empty(prefixes: Sequence[str], split: str) -> None:
    """Every split that gets a share must get tokens from every prefix (Megatron loops forever otherwise)."""
    # lazy: cost (megatron.core, 4-6 s: the config check imports this module, via data/dali.py, without it)
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    names = ("train", "valid", "test")
    for p in prefixes:
        lengths = read_sequence_lengths(p)
        n = len(lengths)
        for name, bounds in zip(names, matrix):
            if bounds is None:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))  # Megatron's own rounding
            if int(lengths[beg:end].sum()) == 0:
                raise ValueError(
                    f"dataset {p} has {n} documents: split {split!r} leaves its {name} part empty; use a corpus "
                    f"with more documents (or smaller --max-doc-chars to split files more), or change the split"
                )


# ----------------------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------------------


def num_microbatches(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """n = G / (m * W); raises ValueError when G is not a multiple of m * W."""
    if micro_batch_size < 1 or dp_size < 1 or global_batch_size < 1:
        raise ValueError("batch sizes and dp_size must be positive")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size {micro_batch_size} "
            f"x data-parallel size {dp_size}"
        )
    return global_batch_size // (micro_batch_size * dp_size)


def global_batch_indices(step: int, global_batch_size: int, start: int = 0) -> np.ndarray:
    """Dataset indices of the global batch of optimizer step ``step``: [start + step*G, start + (step+1)*G)."""
    b = start + step * global_batch_size
    return np.arange(b, b + global_batch_size, dtype=np.int64)


def microbatch_indices(
    step: int,
    microstep: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    global_batch_size: int,
    start: int = 0,
) -> np.ndarray:
    """Dataset indices of DP rank ``dp_rank``'s micro-batch ``microstep`` of step ``step`` (see module doc)."""
    n = num_microbatches(global_batch_size, micro_batch_size, dp_size)
    if not 0 <= microstep < n or not 0 <= dp_rank < dp_size:
        raise ValueError(f"microstep {microstep} / dp_rank {dp_rank} out of range (n={n}, W={dp_size})")
    b = start + step * global_batch_size + microstep * micro_batch_size * dp_size + dp_rank * micro_batch_size
    return np.arange(b, b + micro_batch_size, dtype=np.int64)


_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def make_batch(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """Stack GPTDataset samples into ``{tokens, labels, loss_mask, position_ids, attention_mask}``.

    tokens/labels/position_ids: int64 [b, s]; loss_mask: float32 [b, s]; attention_mask: None (causal
    masking inside the model).
    """
    if not samples:
        raise ValueError("make_batch needs at least one sample")
    out: Dict[str, Optional[torch.Tensor]] = {k: torch.stack([s[k] for s in samples]) for k in _BATCH_KEYS}
    out["loss_mask"] = out["loss_mask"].float()
    out["attention_mask"] = None
    return out


def get_microbatch(dataset, indices: Sequence[int]) -> Dict[str, Optional[torch.Tensor]]:
    """Fetch ``dataset[i]`` for the given indices and stack them with :func:`make_batch`."""
    n = len(dataset)
    for i in indices:
        if not 0 <= int(i) < n:
            raise IndexError(f"sample index {int(i)} beyond the dataset's {n} samples: build the datasets with "
                             "train_samples >= train_iters * global_batch_size")
    return make_batch([dataset[int(i)] for i in indices])
