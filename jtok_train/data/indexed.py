"""Megatron indexed datasets (.bin/.idx): writing from token ids, and validated opening.

Layout written (Megatron-Core's ``IndexedDatasetBuilder``): one sequence per document, each document's ids
followed by the EOD id; dtype uint16 when the vocabulary has fewer than 65,500 ids, else int32.

Opening goes through :func:`validate_indexed` first, which parses the .idx header itself and checks the .bin
size against it, so a missing or truncated file gives a one-line :class:`DataFileError` naming the file and the
fix, instead of an assertion or a numpy buffer error deep inside Megatron.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

__all__ = [
    "DataFileError",
    "IndexInfo",
    "token_dtype",
    "write_indexed_dataset",
    "validate_indexed",
    "open_indexed",
    "check_token_range",
    "read_documents",
    "read_sequence_lengths",
    "read_index",
    "index_header",
]

_INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron DType codes (megatron.core.datasets.indexed_dataset.DType; the format is Megatron's, read and written
# here by hand so that a merge streams and a bad file names itself: see read_index and data/build.py's _merge)
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}

PathLike = Union[str, os.PathLike]


class DataFileError(RuntimeError):
    """A dataset file is missing, truncated or inconsistent. The message is one line with the fix."""


def _fix_hint(prefix: str) -> str:
    out = os.path.dirname(prefix) or "."
    return f"rebuild it with `jtok-data build --source <corpus> --out {out} --force`"


def token_dtype(vocab_size: int):
    """numpy dtype for token ids: uint16 below 65,500 ids (Megatron's rule), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass(frozen=True)
class IndexInfo:
    """What the .idx header says, plus totals."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int
    bin_bytes: int


def write_indexed_dataset(
    prefix: PathLike,
    token_docs: Iterable[Sequence[int]],
    vocab_size: int,
    eod: int,
    append_eod: bool = True,
) -> IndexInfo:
    """Write ``prefix.bin`` / ``prefix.idx`` with one entry (sequence and document) per element of token_docs.

    ``eod`` is appended to every document when ``append_eod``. Empty documents are skipped. Files are written
    under temporary names and renamed at the end, so an interrupted build never leaves a valid-looking pair.
    Returns the :class:`IndexInfo` of the result.
    """
    import torch  # lazy: cost (torch, 2-5 s: jtok-train and jtok-plan import this module at start-up)
    # lazy: cost (megatron.core, 4-6 s: jtok-train and jtok-plan import this module at start-up)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    dtype = token_dtype(vocab_size)
    tmp_bin, tmp_idx = prefix + ".bin.tmp", prefix + ".idx.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    n = 0
    for ids in token_docs:
        if len(ids) == 0:
            continue
        arr = np.asarray(ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= vocab_size:
            builder.data_file.close()
            raise ValueError(f"token id out of range [0, {vocab_size}) in document {n}")
        if append_eod:
            arr = np.append(arr, eod)
        builder.add_item(torch.from_numpy(arr.astype(dtype)))
        builder.end_document()
        n += 1
    builder.finalize(tmp_idx)
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, prefix + ".idx")
    return validate_indexed(prefix)


def validate_indexed(prefix: PathLike) -> IndexInfo:
    """Check that ``prefix.idx`` and ``prefix.bin`` exist and agree; raise :class:`DataFileError` if not."""
    prefix = str(prefix)
    if prefix.endswith((".bin", ".idx")):
        prefix = prefix[:-4]
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for p in (idx_path, bin_path):
        if not os.path.isfile(p):
            raise DataFileError(f"dataset file {p} is missing; {_fix_hint(prefix)}")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != _INDEX_HEADER:
            raise DataFileError(f"dataset index {idx_path} is not a Megatron .idx file (bad header); "
                                f"{_fix_hint(prefix)}")
        version = struct.unpack("<Q", head[9:17])[0]
        code = head[17]
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        if version != 1 or code not in _DTYPES:
            raise DataFileError(f"dataset index {idx_path} has unsupported version {version} / dtype code "
                                f"{code}; {_fix_hint(prefix)}")
        expected_idx = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx_size < expected_idx:
            raise DataFileError(f"dataset index {idx_path} is truncated ({idx_size} bytes, header promises "
                                f"{expected_idx}); {_fix_hint(prefix)}")
        lengths = np.frombuffer(f.read(n_seq * 4), dtype=np.int32)
        pointers = np.frombuffer(f.read(n_seq * 8), dtype=np.int64)
    dtype = _DTYPES[code]
    itemsize = np.dtype(dtype).itemsize
    num_tokens = int(lengths.sum(dtype=np.int64))
    expected_bin = int(pointers[-1] + lengths[-1] * itemsize) if n_seq else 0
    bin_size = os.path.getsize(bin_path)
    if bin_size < expected_bin:
        raise DataFileError(
            f"dataset file {bin_path} is truncated ({bin_size} bytes, {idx_path} expects {expected_bin}); "
            f"{_fix_hint(prefix)}"
        )
    if bin_size > expected_bin:
        raise DataFileError(
            f"dataset file {bin_path} is larger than {idx_path} describes ({bin_size} > {expected_bin} bytes: "
            f"the pair comes from different builds); {_fix_hint(prefix)}"
        )
    return IndexInfo(prefix, dtype, int(n_seq), int(n_doc) - 1, num_tokens, bin_size)


def open_indexed(prefix: PathLike, mmap: bool = True):
    """Validate, then open ``prefix`` as a Megatron ``IndexedDataset``."""
    # lazy: cost (megatron.core, 4-6 s: jtok-train and jtok-plan import this module at start-up)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = validate_indexed(prefix)
    return IndexedDataset(info.prefix, multimodal=False, mmap=mmap)


def check_token_range(prefix: PathLike, vocab_size: int, scan_limit_bytes: int = 4 << 30) -> Optional[int]:
    """Raise :class:`DataFileError` if the dataset holds a token id >= ``vocab_size``; return the max id.

    Uses ``max_token_id`` from the build manifest next to the prefix when there is one (instant); otherwise
    scans the .bin when it is smaller than ``scan_limit_bytes`` (memory-mapped, ~1 GB/s); returns None when
    it did neither.
    """
    info = validate_indexed(prefix)
    max_id: Optional[int] = None
    manifest = Path(info.prefix).parent / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            names = m.get("prefixes") or [m.get("prefix")]  # one prefix, or the shards of a --shard-tokens build
            if Path(info.prefix).name in names and "max_token_id" in m:
                max_id = int(m["max_token_id"])
        except (ValueError, OSError):
            max_id = None
    if max_id is None and info.bin_bytes <= scan_limit_bytes and info.num_tokens > 0:
        max_id = int(np.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r").max())
    if max_id is not None and max_id >= vocab_size:
        raise DataFileError(
            f"dataset {info.prefix}.bin holds token id {max_id} but the tokenizer has {vocab_size} ids: it was "
            f"built with another tokenizer; {_fix_hint(info.prefix)} or pass the matching tokenizer"
        )
    return max_id


def read_documents(prefix: PathLike) -> List[np.ndarray]:
    """All documents of a (small) dataset as arrays, EOD included. For tests and inspection."""
    ds = open_indexed(prefix)
    # copies: the arrays Megatron returns are views into a mmap that closes with the dataset
    return [np.array(ds[i], dtype=np.int64) for i in range(len(ds))]


def read_sequence_lengths(prefix: PathLike) -> np.ndarray:
    """Token count of every sequence (= document for datasets built here), from the .idx (validated)."""
    info = validate_indexed(prefix)
    with open(info.prefix + ".idx", "rb") as f:
        f.seek(34)
        return np.frombuffer(f.read(info.num_sequences * 4), dtype=np.int32).copy()


def read_index(prefix: PathLike) -> tuple[IndexInfo, np.ndarray, np.ndarray, np.ndarray]:
    """(info, sequence lengths int32, sequence pointers int64, document indices int64) of a validated .idx,
    memory-mapped (a merge of many parts holds no index in memory). The document indices start with 0."""
    info = validate_indexed(prefix)
    path, n_seq, n_doc = info.prefix + ".idx", info.num_sequences, info.num_documents + 1
    lengths = np.memmap(path, dtype=np.int32, mode="r", offset=34, shape=(n_seq,)) if n_seq else np.zeros(0, np.int32)
    off = 34 + 4 * n_seq
    pointers = np.memmap(path, dtype=np.int64, mode="r", offset=off, shape=(n_seq,)) if n_seq else np.zeros(0, np.int64)
    docs = np.memmap(path, dtype=np.int64, mode="r", offset=off + 8 * n_seq, shape=(n_doc,))
    return info, lengths, pointers, docs


def index_header(dtype, num_sequences: int, num_documents: int) -> bytes:
    """The 34 header bytes of a version-1 .idx (``num_documents`` counts the leading 0 of the document indices)."""
    code = next(c for c, d in _DTYPES.items() if np.dtype(d) == np.dtype(dtype))
    return _INDEX_HEADER + struct.pack("<QBQQ", 1, code, num_sequences, num_documents)
