"""Step metrics: throughput, MFU, memory, MoE router balance, a console progress bar, metrics.jsonl and W&B.

Only the logging rank writes; every rank computes the same reduced numbers.

W&B runs live in ``<run_dir>/wandb/`` (offline by default: ``wandb sync <run_dir>/wandb/offline-run-*``
uploads them later; ``logging.wandb_mode=online`` streams). The run id is kept in ``<run_dir>/wandb_run_id``
(and in checkpoints through ``Trainer.wandb_run_id``), so a resumed run logs to the same W&B run.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import struct
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from jtok_train.config import RunConfig

__all__ = ["mfu_peak_tflops", "GPU_PEAK_TFLOPS", "StepTimer", "MetricsLogger", "MoEBalanceProbe", "memory_metrics",
           "read_wandb_history", "WANDB_ID_FILE"]

WANDB_ID_FILE = "wandb_run_id"

# Dense bf16 tensor-core peaks per GPU (vendor datasheets), TFLOP/s: the MFU's peak on a GPU whose name holds a
# key, when train.peak_tflops is not given. The run's records name the peak they used (mfu_peak_tflops).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def mfu_peak_tflops(configured: float | None) -> float | None:
    """The per-device peak (TFLOP/s) the MFU is computed against: ``configured`` (train.peak_tflops) when given,
    else the datasheet peak of a GPU in :data:`GPU_PEAK_TFLOPS`; None (no MFU) on CPU and on other GPUs."""
    if configured is not None:
        return float(configured)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)
    return None


class StepTimer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


def memory_metrics() -> dict[str, float]:
    """Host RSS of this process and, on GPU, the peak allocated/reserved device memory (GiB)."""
    out: dict[str, float] = {}
    try:
        out["mem/rss_gib"] = psutil.Process().memory_info().rss / 2**30
    except Exception:  # pragma: no cover - psutil is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["mem/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["mem/max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


class MoEBalanceProbe:
    """Per-layer MoE router balance: forward hooks on Megatron's routers count the tokens routed to each
    expert (training forwards only, this rank's micro-batches); ``collect()`` returns max/mean of the
    counts per layer (1 = even) since the last call, as ``moe/load_imbalance_layer{i}`` and their mean."""

    def __init__(self, model: Any):
        self.counts: dict[int, torch.Tensor] = {}
        self.handles = []
        models = model if isinstance(model, (list, tuple)) else [model]   # model chunks with interleaved stages
        layers = [layer for m in models for layer in (getattr(getattr(m, "decoder", None), "layers", None) or [])]
        for i, layer in enumerate(layers):
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None:
                self.handles.append(router.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not module.training or not isinstance(output, tuple) or len(output) < 2:
                return
            routing_map = output[1]
            c = routing_map.detach().reshape(-1, routing_map.shape[-1]).sum(0).float().cpu()
            self.counts[i] = self.counts[i] + c if i in self.counts else c

        return hook

    def collect(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, c in sorted(self.counts.items()):
            if c.sum() > 0:
                out[f"moe/load_imbalance_layer{i}"] = float(c.max() / c.mean())
        if out:
            out["moe/load_imbalance_mean"] = sum(out.values()) / len(out)
        self.counts.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class MetricsLogger:
    """Progress bar + metrics.jsonl + W&B, on the logging rank only.

    ``run_id``: the W&B run id to continue (a checkpoint's); else the one in ``<run_dir>/wandb_run_id``;
    else a new one. ``self.run_id`` is the id in use (None on the other ranks and without W&B)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, total_steps: int, start_step: int, is_logging_rank: bool,
                 run_id: str | None = None, model: Any = None):
        self.enabled = is_logging_rank
        self.cfg = cfg
        self.bar = None
        self.file = None
        self.wandb_run = None
        self.run_id: str | None = None
        self.probe = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if model is not None and getattr(cfg.model, "num_experts", None):
            self.probe = MoEBalanceProbe(model)
        if cfg.logging.metrics_file:
            self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.train.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.logging.wandb:
            self.wandb_run = self._init_wandb(run_dir, run_id)

    def watch(self, model: Any) -> None:
        """Add the MoE router balance probe to ``model`` (the unwrapped GPTModel)."""
        if self.enabled and self.probe is None and getattr(self.cfg.model, "num_experts", None):
            self.probe = MoEBalanceProbe(model)

    def _init_wandb(self, run_dir: Path, run_id: str | None):
        # lazy: cost (wandb, seconds: only with logging.wandb=true)
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        if run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id + "\n")
        self.run_id = run_id
        os.environ.setdefault("WANDB_SILENT", "true")
        mode = self.cfg.logging.wandb_mode
        return wandb.init(
            project=self.cfg.logging.wandb_project,
            entity=self.cfg.logging.wandb_entity or None,
            name=self.cfg.logging.wandb_name or run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=OmegaConf.to_container(self.cfg, resolve=True),
        )

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> None:
        """Record ``metrics`` for ``step``; ``advance`` moves the progress bar (train steps only). Train steps
        also get memory and (MoE) per-layer router balance."""
        if not self.enabled:
            return
        if advance:
            metrics = {**metrics, **memory_metrics()}
            if self.probe is not None:
                metrics.update(self.probe.collect())
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self._wandb("log", lambda: self.wandb_run.log(metrics, step=step))
        if self.bar is not None and advance:
            post = []
            if "loss" in metrics:
                post.append(f"loss={metrics['loss']:.4f}")
            if "tokens_per_s" in metrics:
                post.append(f"tok/s={metrics['tokens_per_s']:,.0f}")
            if "mfu" in metrics:
                post.append(f"MFU {100 * metrics['mfu']:.3g}% of {metrics['mfu_peak_tflops']:g} TFLOP/s")
            self.bar.set_postfix_str(", ".join(post), refresh=False)
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.remove()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb_run is not None:
            self._wandb("finish", self.wandb_run.finish)
            self.wandb_run = None

    def _wandb(self, what: str, call) -> None:
        """W&B must never stop training: on SIGTERM (preemption) the scheduler signals every process of the
        job, W&B's service included, while the trainer still has a checkpoint to write. Warn once and go on
        with metrics.jsonl and the console."""
        try:
            call()
        except Exception as e:  # noqa: BLE001 - any W&B failure
            self.wandb_run = None
            self.message(f"W&B {what} failed ({type(e).__name__}: {e}); W&B logging is off for the rest of this "
                         "run, metrics.jsonl and the console go on")


# --- reading W&B's run files back (tests, scripts without network) -------------------------------------------
# A run file ``run-<id>.wandb`` is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0),
# then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
# 4 last) and a serialized wandb_internal_pb2.Record as payload.
_BLOCK = 32 * 1024


def _wandb_records(path: Path):
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if rtype == 0 and length == 0:
            continue
        if rtype == 1:
            yield payload
        elif rtype == 2:
            pending = payload
        elif rtype == 3:
            pending += payload
        elif rtype == 4:
            yield pending + payload
            pending = b""


def read_wandb_history(path: Path | str) -> tuple[str | None, list[dict[str, Any]]]:
    """(run id, history rows) of one offline run file ``run-<id>.wandb`` or of every run file under a
    directory (a run resumed offline writes one file per start), rows in file order."""
    # lazy: cost (wandb, seconds: only with logging.wandb=true)
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    files = sorted(path.rglob("run-*.wandb")) if path.is_dir() else [path]
    run_id, rows = None, []
    for f in files:
        for payload in _wandb_records(f):
            rec = pb.Record()
            rec.ParseFromString(payload)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
            elif kind == "history":
                row = {}
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                rows.append(row)
    return run_id, rows
