"""Checkpoints through Megatron-Core's dist_checkpointing (sharded state dicts, ShardedTensors with global
offsets), so a checkpoint saved at one parallel layout / world size loads at another.

Layout::

    <run_dir>/checkpoints/step_0000100/      one complete checkpoint (torch_dist format + common.pt)
        checksums.json                       size + sha256 of every file, written after all ranks finished
    <run_dir>/checkpoints/step_0000200.partial/   a save in progress (or killed mid-save): never loaded
    <run_dir>/checkpoints/latest             name of the newest complete checkpoint

A save writes into ``step_N.partial``; when every rank has finished (barrier), the ranks hash the files,
rank 0 writes ``checksums.json``, renames the directory to ``step_N`` and only then replaces ``latest``
(write + rename). A crash at any point leaves the previous checkpoint complete and marked latest. Older
checkpoints beyond ``train.keep_last`` and stale ``.partial`` directories are removed after a save.

Contents: ``model`` (Megatron's model sharded_state_dict: backbone and replicated JTok tables; with interleaved
pipeline stages model chunk v > 0 adds ``model_vp{v}``, whose keys are global like chunk 0's, so a checkpoint
reshards between layouts with and without virtual stages), ``optimizer``
(Megatron's optimizer, all states), ``extra.<name>`` (pluggable components, below), ``rng.*`` (every rank's
torch/tracker/python/numpy RNG states, one row per rank), and ``meta`` (step, global consumed samples, skipped
steps, world size, the data fingerprint, the resolved config, the LR scheduler state, the W&B run id).

Plugging in a component with its own state (e.g. a sharded token table's optimizer): give it::

    def sharded_state_dict(self, prefix: str) -> dict      # ShardedTensors with global shapes/offsets,
                                                            # keys starting with ``prefix``
    def load_state_dict(self, state: dict) -> None          # receives the loaded dict (same structure)

and list it in ``Trainer.checkpoint_components()`` under a stable name. A module inside the model is
covered by the model's own ``sharded_state_dict`` (Megatron calls a child's ``sharded_state_dict(prefix,
sharded_offsets, metadata)`` when it has one).

Loading never unpickles code: ``common.pt`` is read with ``torch.load(weights_only=True)`` and the torch_dist
``.metadata`` pickle is first read with an allow-list unpickler (only torch.distributed.checkpoint metadata
classes, torch dtypes/sizes and builtins); a checkpoint with any other global, or with pickled objects
(ShardedObjects), is refused. Files are checked against ``checksums.json`` before loading.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from jtok_train.compat import megatron as megatron_compat
from jtok_train.training.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "MODEL_SECTIONS",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume_path",
    "read_meta",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "config_differences",
    "data_fingerprint",
    "CheckpointError",
]

FORMAT_VERSION = 1
# Config sections that define the model's parameters: a checkpoint only loads into the same values.
MODEL_SECTIONS = ("model", "jtok")
CHECKSUMS = "checksums.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


# -- paths -----------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints (with checksums.json) of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / CHECKSUMS).is_file()]


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The checkpoint named by ``checkpoints/latest``; without a marker, the newest complete one."""
    marker = Path(run_dir) / "checkpoints" / "latest"
    if marker.is_file():
        path = marker.parent / marker.read_text().strip()
        if not path.is_dir():
            raise CheckpointError(f"{marker} names {path.name}, which does not exist: restore it or pass "
                                  f"train.resume_from=<a checkpoint directory>")
        return path
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def resolve_resume_path(cfg: Any) -> Path | None:
    """train.resume_from (a checkpoint directory, or a run directory: its latest), else with
    train.auto_resume the latest checkpoint of train.run_dir, else None."""
    t = cfg.train
    if t.resume_from:
        p = Path(t.resume_from)
        if not p.exists():
            raise CheckpointError(f"train.resume_from={t.resume_from} does not exist")
        if (p / "checkpoints").is_dir():
            found = latest_checkpoint(p)
            if found is None:
                raise CheckpointError(f"train.resume_from={t.resume_from} is a run directory without a complete "
                                      "checkpoint")
            return found
        return p
    if t.auto_resume:
        return latest_checkpoint(t.run_dir)
    return None


# -- data fingerprint and config comparison -------------------------------------------------------------
def data_fingerprint(cfg: Any, tokenizer_sha256: str) -> str:
    """sha256 of what determines the sample order: each dataset's build fingerprint (its manifest.json, else
    the .idx/.bin sizes and the .idx sha256), the blend weights, split, sequence length, seed and tokenizer."""
    parts: list[Any] = []
    for prefix in cfg.data.prefixes:
        prefix = str(prefix)
        prefix = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
        manifest = Path(prefix).parent / "manifest.json"
        entry: Any = None
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text())
                if m.get("prefix") == Path(prefix).name and m.get("fingerprint"):
                    entry = ["manifest", m["fingerprint"]]
            except (ValueError, OSError):
                entry = None
        if entry is None:
            idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
            entry = ["files", idx.stat().st_size if idx.is_file() else None,
                     bin_.stat().st_size if bin_.is_file() else None,
                     hashlib.sha256(idx.read_bytes()).hexdigest() if idx.is_file() else None]
        parts.append([Path(prefix).name, entry])
    d, t = cfg.data, cfg.train
    blob = {"datasets": parts, "weights": list(d.weights) if d.weights is not None else None, "split": d.split,
            "seq_length": cfg.model.seq_length, "seed": t.seed, "tokenizer_sha256": tokenizer_sha256}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Training hyperparameters inside the model sections: they may change on resume.
NOT_MODEL_KEYS = {"jtok.lr_mult", "jtok.weight_decay", "jtok.table_optimizer", "jtok.aux_loss_coeff",
                  "model.moe_aux_loss_coeff",
                  # activation recompute changes memory and time, not the parameters: switch it on resume
                  "model.recompute_granularity", "model.recompute_method", "model.recompute_num_layers",
                  "model.recompute_modules"}


def config_differences(saved_yaml: str, cfg: Any, sections: tuple[str, ...] = MODEL_SECTIONS) -> list[str]:
    """``key: saved -> now`` for every differing key of the given sections (NOT_MODEL_KEYS aside)."""
    saved = OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = []
    for sec in sections:
        a, b = _flat(saved.get(sec) or {}, f"{sec}."), _flat(now.get(sec) or {}, f"{sec}.")
        for key in sorted(set(a) | set(b)):
            if key not in NOT_MODEL_KEYS and a.get(key, "<absent>") != b.get(key, "<absent>"):
                diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


# -- safe reading -------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS_PREFIXES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                             "torch.distributed.checkpoint.filesystem")
_ALLOWED_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set"),
                    ("builtins", "frozenset"), ("builtins", "slice"), ("copyreg", "_reconstructor"),
                    ("builtins", "object"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        ok = module.startswith(_ALLOWED_GLOBALS_PREFIXES) or (module, name) in _ALLOWED_GLOBALS
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            ok = True
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _check_metadata(path: Path) -> None:
    """Read the torch_dist .metadata with the allow-list unpickler (torch.distributed.checkpoint then reads
    the same bytes with plain pickle)."""
    meta_file = path / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no .metadata file: it is incomplete; resume from an "
                              "earlier one (train.resume_from=...)")
    try:
        with open(meta_file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path}: .metadata references {e}, which is not allowed (loading runs "
                              "no pickled code); the checkpoint was not written by jtok-train") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage bytes
        raise CheckpointError(f"checkpoint {path}: .metadata is unreadable ({type(e).__name__}): the "
                              "checkpoint is corrupted; resume from an earlier one") from None
    if not hasattr(md, "state_dict_metadata"):
        raise CheckpointError(f"checkpoint {path}: .metadata is not torch.distributed.checkpoint metadata")


class _param_groups_in_order:
    """Megatron matches loaded parameter groups to the current ones by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr); two groups with equal keys (the token-table group has lr_mult 1 and its own max_lr)
    collide there. The groups are saved in the optimizer's (deterministic) order, so when keys repeat, match
    them by position instead, checking each pair's keys."""

    def __enter__(self):
        keys = megatron_compat.param_group_identifier_keys()

        def ident(g):
            return tuple(g.get(k, g.get(f"pre_{k}")) for k in keys)

        def filter_groups(original, current_groups, state_dict_groups):
            if len({ident(g) for g in current_groups}) == len(current_groups):
                return original(current_groups, state_dict_groups)
            if [ident(g) for g in current_groups] != [ident(g) for g in state_dict_groups]:
                raise CheckpointError("the checkpoint's optimizer parameter groups do not match this model's "
                                      f"({[ident(g) for g in state_dict_groups]} vs "
                                      f"{[ident(g) for g in current_groups]})")
            return list(state_dict_groups)

        self._cm = megatron_compat.replace_param_group_matching(
            lambda original: lambda cur, saved: filter_groups(original, cur, saved))
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


class _weights_only_objects:
    """During a load, read ShardedObjects (byte items, e.g. a layer's ``_extra_state``) with
    ``torch.load(weights_only=True)`` instead of torch.distributed.checkpoint's ``weights_only=False``."""

    def __enter__(self):
        def read_object(value, fqn):
            try:
                return torch.load(value, weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"checkpoint object {fqn} is not plain data "
                                      f"({type(e).__name__}): refused, loading runs no pickled code") from None

        self._cm = megatron_compat.replace_load_bytes(read_object)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


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


def _write_checksums(path: Path, rank: int, world: int) -> None:
    files = _files(path)
    mine = {n: [(path / n).stat().st_size, _sha256(path / n)] for n in _spread(files, rank, world)}
    if world > 1:
        gathered: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, mine)
        mine = {k: v for g in gathered for k, v in g.items()}
    if rank == 0:
        _atomic_write(path / CHECKSUMS, json.dumps({"format": FORMAT_VERSION, "files": mine}, indent=1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the save strategy -----------------------------------------------------------------------------------
def _save_strategy(kill_after_bytes: int | None = None):
    """torch_dist format written synchronously by torch.distributed.checkpoint's FileSystemWriter.

    Megatron's default torch_dist strategy goes through its async writer, which starts a multiprocessing
    "spawn" manager (~5 s on the first save, and it needs non-daemonic processes) and forks writer processes
    on every save; the plain writer runs in the calling thread and writes the same format (loaded by
    Megatron's default torch_dist load strategy).

    The common (non-tensor) state is always in ``common.pt`` (rank 0), whichever megatron-core writes it:
    on 0.19 this strategy does (see ``jtok_train.compat.megatron.pop_common_state``)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SyncTorchDistSave(megatron_compat.torch_dist_save_strategy_class()):
        def save(self, sharded_state_dict, checkpoint_dir):
            ours, common = megatron_compat.pop_common_state(sharded_state_dict)
            if ours and dist.get_rank() == 0:
                torch.save(common, Path(checkpoint_dir) / "common.pt")
            sd = megatron_compat.sharded_keys_state_dict(sharded_state_dict, self.keep_only_main_replica)
            pyt = megatron_compat.to_pyt_state_dict(sd)
            writer = FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True)
            if kill_after_bytes is not None:
                _kill_while_writing(writer, kill_after_bytes)
            dcp_save(pyt, storage_writer=writer, planner=megatron_compat.save_planner(self.keep_only_main_replica))

    return SyncTorchDistSave("torch_dist", 1)


def _kill_while_writing(writer: Any, after_bytes: int) -> None:
    """Fault injection for the crash tests: SIGKILL this rank in the middle of writing its first shard file
    (``after_bytes`` bytes into it), from inside torch.distributed.checkpoint's file writer."""
    import signal
    from contextlib import contextmanager

    create = writer.fs.create_stream

    class Killing:
        def __init__(self, stream):
            self.stream, self.written = stream, 0

        def write(self, data):
            n = len(memoryview(data).cast("B"))
            if self.written + n > after_bytes:
                self.stream.write(memoryview(data).cast("B")[: max(0, after_bytes - self.written)])
                self.stream.flush()
                os.fsync(self.stream.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            self.written += n
            return self.stream.write(data)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    @contextmanager
    def create_stream(path, mode):
        with create(path, mode) as stream:
            yield Killing(stream) if str(path).endswith(".distcp") and "w" in mode else stream

    writer.fs.create_stream = create_stream


# -- RNG -------------------------------------------------------------------------------------------------
def _rng_tensors() -> dict[str, torch.Tensor]:
    """This rank's RNG states as 1-D tensors (name -> tensor; same names and lengths on every rank)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    out = {"torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state().cpu()
    for name, state in sorted(get_cuda_rng_tracker().get_states().items()):
        out[f"tracker.{name}"] = state.detach().cpu().clone()
    version, internal, gauss = random.getstate()
    out["python"] = torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64)
    out["python_gauss"] = torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    return out


def _set_rng(states: dict[str, torch.Tensor]) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(states["torch_cpu"].to(torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].to(torch.uint8))
    tracker = {k[len("tracker."):]: v.to(torch.uint8) for k, v in states.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
    py = states["python"].tolist()
    gauss = float(states["python_gauss"][0]) if py[-1] == 1 else None
    random.setstate((py[0], tuple(py[1:-1]), gauss))
    npy = states["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(npy[:-2], dtype=np.uint32), npy[-2], npy[-1],
                         float(states["numpy_gauss"][0])))


def _rng_sharded(rank: int, world: int, local: dict[str, torch.Tensor]) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {
        name: ShardedTensor.from_rank_offsets(f"rng.{name}", t.unsqueeze(0), (0, rank, world), replica_id=0)
        for name, t in local.items()
    }


# -- save / load -----------------------------------------------------------------------------------------
def _components(trainer: Any) -> dict[str, Any]:
    fn = getattr(trainer, "checkpoint_components", None)
    return dict(fn()) if fn is not None else {}


def optimizer_layout(cfg: Any) -> dict:
    """How Megatron's optimizer is checkpointed: plain (states per parameter) or the distributed optimizer
    with its ``distrib_optim_sharding_type`` (train.ckpt_optim_format). Stored in the checkpoint's meta; a
    load uses the checkpoint's layout, not the current config's."""
    if not cfg.parallel.use_distributed_optimizer:
        return {"distributed": False, "format": None}
    p = cfg.parallel
    return {"distributed": True, "format": str(cfg.train.ckpt_optim_format),
            "model_parallel": [int(p.tensor_model_parallel_size), int(p.pipeline_model_parallel_size),
                               int(p.expert_model_parallel_size)]
            + ([int(p.virtual_pipeline_model_parallel_size)] if (p.virtual_pipeline_model_parallel_size or 1) > 1 else [])}


def model_sections(trainer: Any) -> dict[str, Any]:
    """Every model chunk's sharded state dict: ``model`` (chunk 0, the only one without interleaved stages),
    ``model_vp{v}`` for chunk v > 0. The keys inside are global (layer numbers, table layer offsets)."""
    chunks = getattr(trainer, "chunks", None) or [trainer.model]
    return {"model" if v == 0 else f"model_vp{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}


def _state(trainer: Any, is_loading: bool, rng: dict | None, layout: dict | None = None) -> dict:
    sections = model_sections(trainer)
    # Megatron's optimizer finds each parameter's sharded tensor anywhere in the dict it is given
    model_sd = sections["model"] if len(sections) == 1 else sections
    if is_loading:
        megatron_compat.allocate_distributed_optimizer_state(trainer.optimizer)
    layout = layout or optimizer_layout(trainer.cfg)
    # Megatron's default distributed-optimizer layout (fully_sharded_model_space) uses flattened ShardedTensors,
    # which its torch_dist strategy no longer writes: name a supported one.
    metadata = {"distrib_optim_sharding_type": layout["format"]} if layout["distributed"] else None
    opt_sd = trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    state = {**sections, "optimizer": opt_sd}
    extra = {}
    for name, comp in _components(trainer).items():
        if not hasattr(comp, "sharded_state_dict"):
            raise CheckpointError(f"component {name!r} ({type(comp).__name__}) has no sharded_state_dict(prefix): "
                                  "its state cannot be checkpointed (see jtok_train/training/checkpoint.py)")
        extra[name] = comp.sharded_state_dict(prefix=f"extra.{name}.")
    if extra:
        state["extra"] = extra
    if rng is not None:
        state["rng"] = rng
    return state


def save_checkpoint(trainer: Any, step: int, consumed_samples: int | None = None,
                    extra_meta: dict | None = None) -> Path:
    """Save the trainer's full state at ``step`` (collective). Returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing

    cfg = trainer.cfg
    rank, world = dist.get_rank(), dist.get_world_size()
    final = checkpoint_dir(trainer.run_dir, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (final.parent / "REQUEUE").unlink(missing_ok=True)
    dist.barrier()
    if consumed_samples is None:
        consumed_samples = step * cfg.train.global_batch_size
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "consumed_samples": int(consumed_samples),
        "world_size": world,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "data_fingerprint": getattr(trainer, "data_fingerprint", None),
        "scheduler": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                      for k, v in trainer.scheduler.state_dict().items()},
        "rng_names": sorted(_rng_tensors()),
        "optimizer_layout": optimizer_layout(cfg),
        **(extra_meta or {}),
    }
    state = _state(trainer, is_loading=False, rng=_rng_sharded(rank, world, _rng_tensors()))
    state["meta"] = meta
    # fault injection for the crash tests: JTOK_FAULT_KILL_IN_WRITE=<step>[:<rank>] kills inside the writer
    kill = os.environ.get("JTOK_FAULT_KILL_IN_WRITE", "").split(":")
    kill_here = kill[0] == str(step) and (len(kill) < 2 or kill[1] == str(rank))
    dist_checkpointing.save(state, str(partial), sharded_strategy=_save_strategy(4096 if kill_here else None))
    if os.environ.get("JTOK_FAULT_KILL_IN_SAVE") == str(step):   # fault injection for the crash tests
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    _write_checksums(partial, rank, world)
    dist.barrier()
    if rank == 0:
        if final.exists():   # re-saving a step (e.g. after resuming from an older checkpoint)
            trash = final.with_name(final.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        partial.rename(final)
        _fsync_dir(final.parent)
        _atomic_write(final.parent / "latest", final.name + "\n")
        _cleanup(final.parent, keep_last=int(cfg.train.keep_last), keep={final.name})
    dist.barrier()
    return final


def _cleanup(root: Path, keep_last: int, keep: set[str]) -> None:
    for p in root.iterdir():
        if p.is_dir() and p.name.endswith((".partial", ".old")):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last > 0:
        done = list_checkpoints(root.parent)
        for p in done[:-keep_last]:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def check_compatible(path: Path, meta: dict, cfg: Any, data_fp: str | None) -> None:
    """Raise CheckpointError when the checkpoint's model config or data differ from ``cfg``."""
    diffs = config_differences(meta["config"], cfg)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointError(f"checkpoint {path} is from a different model config: {'; '.join(diffs[:3])}{more}; "
                              "use the checkpoint's config or a fresh train.run_dir")
    saved_fp = meta.get("data_fingerprint")
    if data_fp and saved_fp and saved_fp != data_fp and not cfg.train.ignore_data_change:
        raise CheckpointError(f"checkpoint {path} was trained on different data (fingerprint {saved_fp[:12]} != "
                              f"{data_fp[:12]}: datasets, blend, split, seq_length, seed or tokenizer changed), so "
                              "the sample order would not continue; set train.ignore_data_change=true to resume "
                              "anyway")


def load_sharded_state(state: dict, path: Path, into: str) -> tuple[dict, set, set]:
    """dist_checkpointing.load with safe unpickling; any failure becomes one CheckpointError line.
    Returns (loaded state, keys in the checkpoint not asked for, keys asked for but absent)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    try:
        with _weights_only_objects():
            return dist_checkpointing.load(state, str(path), strict=StrictHandling.RETURN_ALL)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a shape mismatch or an unreadable shard, in one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not load into {into}: {first}") from None


def load_checkpoint(trainer: Any, path: Path | str) -> dict:
    """Load a checkpoint into the trainer's model, optimizer, scheduler, components and (at the same world
    size) RNG states. Collective. Returns the checkpoint's meta."""
    path = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    if trainer.cfg.train.verify_checksums:
        verify_checkpoint(path, rank, world)
    _check_metadata(path)
    meta = read_meta(path)
    check_compatible(path, meta, trainer.cfg, getattr(trainer, "data_fingerprint", None))
    local_rng = _rng_tensors()
    same_rng = meta["world_size"] == world and meta.get("rng_names") == sorted(local_rng)
    rng = _rng_sharded(rank, world, local_rng) if same_rng else None
    saved_layout = meta.get("optimizer_layout", {"distributed": False, "format": None})
    if saved_layout["distributed"] != bool(trainer.cfg.parallel.use_distributed_optimizer):
        raise CheckpointError(f"checkpoint {path} holds the states of the "
                              f"{'distributed' if saved_layout['distributed'] else 'plain'} optimizer: resume with "
                              f"parallel.use_distributed_optimizer={str(saved_layout['distributed']).lower()}")
    now = optimizer_layout(trainer.cfg).get("model_parallel")
    was = saved_layout.get("model_parallel")
    if saved_layout.get("format") == "dp_reshardable" and was is not None and was != now:
        what = "TP/PP/EP/VPP" if max(len(was), len(now)) > 3 else "TP/PP/EP"
        raise CheckpointError(f"checkpoint {path} holds the distributed optimizer as dp_reshardable at {what} = "
                              f"{'/'.join(map(str, was))}, which reshards over data parallelism only: resume at "
                              f"{what} = {'/'.join(map(str, was))} (now {'/'.join(map(str, now))}), or save with "
                              "train.ckpt_optim_format=fully_reshardable")
    state = _state(trainer, is_loading=True, rng=rng, layout=saved_layout)
    loaded, missing, unexpected = load_sharded_state(state, path, "this model")
    missing = sorted(k for k in missing if not k.startswith("rng."))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} key(s) this model needs ({missing[0]}, ...): "
                              "it is from a different model or parallel layout")
    # keys are "module.<name>" (Megatron's DDP adds "module."; Float16Module forwards its child's keys without
    # a prefix of its own), so fp32 and bf16 checkpoints share one layout: load into the unwrapped model
    # (whose parameters DDP and Float16Module share), a bf16 checkpoint into an fp32 model and back.
    chunks = getattr(trainer, "unwrapped_chunks", None) or [trainer.unwrapped]
    for v, chunk in enumerate(chunks):
        model_state = {}
        for k, val in loaded["model" if v == 0 else f"model_vp{v}"].items():
            if not k.startswith("module."):
                raise CheckpointError(f"checkpoint {path}: model key {k} lacks the module. prefix of jtok-train's "
                                      "training checkpoints")
            model_state[k[len("module."):]] = val
        chunk.load_state_dict(model_state, strict=True)
    with torch.no_grad(), _param_groups_in_order():
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    for name, comp in _components(trainer).items():
        comp.load_state_dict(loaded["extra"][name])
    # The LR schedule is a function of the consumed samples: take the position from the checkpoint and the
    # shape (peak, warmup, decay) from the current config, so train.train_iters may grow on resume.
    trainer.scheduler.num_steps = int(meta["scheduler"]["num_steps"])
    trainer.scheduler.step(0)
    if rng is not None:
        _set_rng({k: v[0] for k, v in loaded["rng"].items()})
    return meta
