"""What makes a checkpoint trustworthy: the checksums of its files, durable (fsynced, atomic) writes, and
reading it without running pickled code.

Loading never unpickles code: ``common.pt`` is read with ``torch.load(weights_only=True)`` (``read_meta``) and
the torch_dist ``.metadata`` pickle is first read with an allow-list unpickler (``read_dcp_metadata``: only
torch.distributed.checkpoint metadata classes, torch dtypes/sizes and builtins); a checkpoint with any other
global is refused. Byte objects inside the torch_dist files are read with ``weights_only=True`` too (see
``jtok_train.checkpoint.megatron_io.weights_only_objects``). Files are checked against ``checksums.json``
(``verify_checkpoint``) before loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jtok_train.checkpoint.layout import CHECKSUMS, FORMAT_VERSION
from jtok_train.errors import CheckpointError

__all__ = [
    "verify_checkpoint",
    "write_checksums",
    "atomic_write",
    "fsync_dir",
    "MetadataUnpickler",
    "read_dcp_metadata",
    "read_meta",
]


# -- checksums -------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _spread(items: list[str], rank: int, world: int) -> list[str]:
    return items[rank::world]


def verify_checkpoint(path: Path | str, rank: int = 0, world: int = 1) -> None:
    """Check every file against checksums.json (work spread over ranks; collective when world > 1)."""
    path = Path(path)
    problems: list[str] = []
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        problems.append(f"checkpoint {path} has no {CHECKSUMS}: its save did not finish; resume from an earlier "
                        "one (train.resume_from=...)")
        sums = {}
    else:
        try:
            sums = json.loads(sums_file.read_text())["files"]
        except (ValueError, KeyError, OSError):
            problems.append(f"checkpoint {path}: {CHECKSUMS} is corrupted")
            sums = {}
    if not problems:
        extra = set(_files(path)) - set(sums)
        for name in _spread(sorted(sums), rank, world):
            size, digest = sums[name]
            f = path / name
            if not f.is_file():
                problems.append(f"checkpoint {path} is missing {name}; resume from an earlier one")
            elif f.stat().st_size != size:
                problems.append(f"checkpoint {path}: {name} is truncated or altered ({f.stat().st_size} bytes, "
                                f"expected {size}); resume from an earlier one")
            elif _sha256(f) != digest:
                problems.append(f"checkpoint {path}: {name} is corrupted (sha256 mismatch); resume from an "
                                "earlier one")
        if extra and rank == 0:
            problems.append(f"checkpoint {path} has unexpected files ({sorted(extra)[0]}, ...)")
    if world > 1:
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, problems)
        problems = [p for g in gathered for p in g]
    if problems:
        raise CheckpointError(problems[0])


def write_checksums(path: Path, rank: int, world: int) -> None:
    """Hash every file of ``path`` (spread over ranks; collective when world > 1); rank 0 writes
    checksums.json."""
    files = _files(path)
    mine = {n: [(path / n).stat().st_size, _sha256(path / n)] for n in _spread(files, rank, world)}
    if world > 1:
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, mine)
        mine = {k: v for g in gathered for k, v in g.items()}
    if rank == 0:
        atomic_write(path / CHECKSUMS, json.dumps({"format": FORMAT_VERSION, "files": mine}, indent=1))


# -- durable writes --------------------------------------------------------------------------------------
def atomic_write(path: Path, text: str) -> None:
    """Write + fsync a temporary file, rename it over ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- safe reading ----------------------------------------------------------------------------------------
_ALLOWED_GLOBALS_PREFIXES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                             "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set"),
                    ("builtins", "frozenset"), ("builtins", "slice"), ("copyreg", "_reconstructor"),
                    ("builtins", "object"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler for torch_dist ``.metadata`` files that resolves only the allow-listed globals
    (torch.distributed.checkpoint metadata classes, torch dtypes/sizes, builtins); any other global raises
    ``pickle.UnpicklingError`` naming it."""

    def find_class(self, module: str, name: str) -> Any:
        ok = module.startswith(_ALLOWED_GLOBALS_PREFIXES) or (module, name) in _ALLOWED_GLOBALS
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            ok = True
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def read_dcp_metadata(path: Path | str) -> Any:
    """The checkpoint's torch_dist ``.metadata`` (a ``torch.distributed.checkpoint.Metadata``), read with the
    allow-list unpickler; a missing, unreadable or unsafe file is a CheckpointError. Call it before
    torch.distributed.checkpoint reads the same bytes with plain pickle."""
    path = Path(path)
    meta_file = path / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no .metadata file: it is incomplete; resume from an "
                              "earlier one (train.resume_from=...)")
    try:
        with open(meta_file, "rb") as f:
            md = MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path}: .metadata references {e}, which is not allowed (loading runs "
                              "no pickled code); the checkpoint was not written by jtok-train") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage bytes
        raise CheckpointError(f"checkpoint {path}: .metadata is unreadable ({type(e).__name__}): the "
                              "checkpoint is corrupted; resume from an earlier one") from None
    if not hasattr(md, "state_dict_metadata"):
        raise CheckpointError(f"checkpoint {path}: .metadata is not torch.distributed.checkpoint metadata")
    return md


def read_meta(path: Path | str) -> dict:
    """The ``meta`` section of a checkpoint (no code runs: weights_only)."""
    path = Path(path)
    common = path / "common.pt"
    if not common.is_file():
        raise CheckpointError(f"checkpoint {path} has no common.pt: it is incomplete or not a jtok-train "
                              "checkpoint; resume from an earlier one (train.resume_from=...)")
    try:
        state = torch.load(common, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path}: common.pt is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''}): corrupted or unsafe") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a jtok-train checkpoint of format {FORMAT_VERSION}")
    return meta
