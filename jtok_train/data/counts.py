"""Token-id counts of a built dataset, and the hot ids they give (``parallel.hot_rows``).

``jtok-data build`` writes ``<prefix>.counts.npy`` beside each output ``.bin``/``.idx`` (int64, one count per id up
to the largest id present); ``jtok-data stats --count-ids`` writes it for a dataset built before. Counting reads
the ``.bin`` in chunks (memory flat in the corpus size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jtok_train.data.indexed import DataFileError, validate_indexed

__all__ = ["COUNTS_SUFFIX", "counts_path", "count_token_ids", "write_token_counts", "hot_token_ids", "HotRowsError"]

COUNTS_SUFFIX = ".counts.npy"
_CHUNK = 1 << 18   # tokens per bincount (its input is cast to int64: 2 MiB a chunk; memory flat in the corpus size)


class HotRowsError(DataFileError):
    """The hot ids cannot be found (one line: the value and the fix)."""


def counts_path(prefix: str) -> Path:
    return Path(str(prefix) + COUNTS_SUFFIX)


def count_token_ids(prefix: str) -> np.ndarray:
    """How often each token id occurs in the dataset ``prefix`` (``.bin``/``.idx``), EOD included."""
    info = validate_indexed(prefix)
    counts = np.zeros(0, dtype=np.int64)
    if not info.num_tokens:
        return counts
    itemsize = np.dtype(info.dtype).itemsize
    with open(info.prefix + ".bin", "rb") as f:   # plain reads: a memmap's pages would stay resident
        while chunk := f.read(_CHUNK * itemsize):
            c = np.bincount(np.frombuffer(chunk, dtype=info.dtype))
            if len(c) > len(counts):
                counts = np.pad(counts, (0, len(c) - len(counts)))
            counts[: len(c)] += c
    return counts


def write_token_counts(prefix: str) -> Path:
    out = counts_path(prefix)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, count_token_ids(prefix))
    tmp.replace(out)
    return out


def _read_id_file(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise HotRowsError(f"parallel.hot_rows_file={path!r}: no such file (a .npy or text file of token ids, "
                           "most frequent first)")
    try:
        ids = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise HotRowsError(f"parallel.hot_rows_file={path!r} is not a list of token ids ({e}): write one id per "
                           "line, or a .npy array") from None
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def hot_token_ids(prefixes: Sequence[str], num_hot: int, vocab_size: int, file: Optional[str] = None) -> np.ndarray:
    """The ``num_hot`` most frequent token ids (ties: the smaller id first), from ``file`` (its first ids) or
    from the datasets' counts (summed over ``prefixes``); ascending."""
    if num_hot <= 0:
        return np.zeros(0, dtype=np.int64)
    if file is not None:
        ids = _read_id_file(file)
        if np.unique(ids).size != ids.size:
            raise HotRowsError(f"parallel.hot_rows_file={file!r} lists an id twice: list each id once")
        if ids.size < num_hot:
            raise HotRowsError(f"parallel.hot_rows={num_hot} but parallel.hot_rows_file={file!r} lists only "
                               f"{ids.size} ids: lower parallel.hot_rows or list more ids")
        ids = ids[:num_hot]
    else:
        total = np.zeros(vocab_size, dtype=np.int64)
        for prefix in prefixes:
            path = counts_path(prefix)
            if not path.is_file():
                raise HotRowsError(f"parallel.hot_rows={num_hot} needs the data's token counts and {path} is "
                                   f"missing: run `jtok-data stats {prefix} --count-ids` (or set "
                                   "parallel.hot_rows_file)")
            c = np.load(path)
            if len(c) > vocab_size:
                raise HotRowsError(f"{path} counts ids up to {len(c) - 1}, outside model.vocab_size={vocab_size}: "
                                   "the data was tokenised with a larger vocabulary")
            total[: len(c)] += c
        ids = np.argsort(-total, kind="stable")[:num_hot]
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise HotRowsError(f"parallel.hot_rows_file={file!r} holds id {int(ids.max() if ids.max() >= vocab_size else ids.min())} "
                           f"outside the vocabulary [0, {vocab_size})")
    return np.sort(ids)
