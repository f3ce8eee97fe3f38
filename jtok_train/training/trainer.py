"""The training loop and its cadence. What a step does is the train module's (``train_module.py``: model,
Megatron's DDP, schedule and the chained optimizers); what happens around the steps is the callbacks'
(``callbacks.py``: metrics, validation, downstream evaluation, checkpoints, preemption, the non-finite policy).
The trainer owns the process setup, the data and the order of things; it knows nothing of the table layout.

Batch order (independent of the number of ranks): optimizer step k consumes global samples
[k*G, (k+1)*G); micro-step i of data-parallel rank r takes the m samples starting at
k*G + i*m*W + r*m (``jtok_train.data.datasets.microbatch_indices``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from jtok_train.checkpoint import (
    checkpoint_dir,
    data_fingerprint,
    load_checkpoint,
    read_meta,
    resolve_resume_path,
    save_checkpoint,
)
from jtok_train.compat import device as compute_device
from jtok_train.compat import init_distributed, init_model_parallel
from jtok_train.compat.megatron import clear_aux_losses, versions, warn_if_untested
from jtok_train.config import ConfigError, RunConfig, validate
from jtok_train.data.datasets import build_datasets, get_microbatch, microbatch_indices, num_microbatches
from jtok_train.data.indexed import DataFileError
from jtok_train.data.tokenizer import Tokenizer, load_tokenizer
from jtok_train.model.builder import virtual_stages
from jtok_train.training.callbacks import Callback, default_callbacks
from jtok_train.training.metrics import MetricsLogger, StepTimer, mfu_peak_tflops
from jtok_train.training.signals import PreemptionFlag
from jtok_train.training.train_module import TrainModule

__all__ = ["Trainer", "TrainResult", "ProcessSetup", "ResumePoint", "build_trainer", "setup_process",
           "find_resume", "build_data", "build_callbacks", "train"]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)      # train LM loss per step (global mean)
    valid_loss: float | None = None
    steps: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    checkpoint: str | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2,5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(parts)


def _set_threads(cfg: RunConfig) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, local))
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    return threads


@dataclass
class ProcessSetup:
    """This process's place in the run: torch.distributed and Megatron's parallel state are set up."""

    rank: int
    world: int
    threads: int
    device: torch.device
    dp_rank: int
    dp_size: int
    num_micro: int          # micro-batches of one optimizer step on this rank
    num_valid_micro: int    # micro-batches of one validation pass on this rank


def setup_process(cfg: RunConfig, tokenizer: Tokenizer) -> ProcessSetup:
    """torch.distributed (threads per rank, the backend), the config validated against the world size and the
    tokenizer, then Megatron's parallel state (TP, PP with virtual stages, EP, the seeds)."""
    p, t = cfg.parallel, cfg.train
    threads = _set_threads(cfg)
    init_distributed(p.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())    # which node each rank runs on, for the log
    if rank == 0:
        print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), flush=True)
        print(f"ranks: {world} on {len(set(hosts))} host(s): " + "; ".join(
            f"{h} {_ranges([r for r, x in enumerate(hosts) if x == h])}" for h in dict.fromkeys(hosts)), flush=True)
        warn_if_untested()
    validate(cfg, world_size=world, tokenizer_vocab=tokenizer.vocab_size)
    vpp = virtual_stages(cfg)
    init_model_parallel(
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        ep=p.expert_model_parallel_size,
        etp=p.expert_tensor_parallel_size,
        seed=t.seed,
        **({"virtual_pipeline_model_parallel_size": vpp} if vpp > 1 else {}),
    )
    dp_size = ps.get_data_parallel_world_size()
    # Megatron's aux-loss tracker is process-global and sized by the first model's layer count.
    clear_aux_losses(reset=True)
    return ProcessSetup(rank=rank, world=world, threads=threads, device=compute_device(),
                        dp_rank=ps.get_data_parallel_rank(), dp_size=dp_size,
                        num_micro=num_microbatches(t.global_batch_size, t.micro_batch_size, dp_size),
                        num_valid_micro=num_microbatches(t.eval_samples, t.micro_batch_size, dp_size))


@dataclass
class ResumePoint:
    """Where the run starts: the checkpoint to resume from (train.resume_from, else the run's latest with
    train.auto_resume) and its metadata, read before the datasets are sized; ``data_offset``: the batch of step
    k is dataset samples [data_offset + k*G, data_offset + (k+1)*G), so a resume at another global batch size
    continues from the checkpoint's consumed samples."""

    path: Path | None
    meta: dict | None
    data_offset: int
    data_fingerprint: str


def find_resume(cfg: RunConfig, setup: ProcessSetup, tokenizer: Tokenizer) -> ResumePoint:
    t = cfg.train
    random.seed(t.seed)            # Python's and numpy's global RNGs too: every checkpointed state is a
    np.random.seed(t.seed)         # function of the seed and the step
    path = resolve_resume_path(cfg)
    if setup.rank == 0:    # a restart clears the previous preemption's requeue marker
        (Path(t.run_dir) / "checkpoints" / "REQUEUE").unlink(missing_ok=True)
    meta = read_meta(path) if path is not None else None
    offset = int(meta["consumed_samples"]) - int(meta["step"]) * t.global_batch_size if meta is not None else 0
    return ResumePoint(path, meta, offset, data_fingerprint(cfg, tokenizer.sha256))


def build_data(cfg: RunConfig, tokenizer: Tokenizer, resume: ResumePoint) -> tuple[Any, Any]:
    """The training and validation datasets (Megatron's GPTDataset over the blend of data.prefixes), sized for
    the rest of the run."""
    t = cfg.train
    prefixes = list(cfg.data.prefixes)
    if not prefixes:
        raise ConfigError("data.prefixes is empty: build a dataset with `jtok-data build` and list its prefix")
    weights = list(cfg.data.weights) if cfg.data.weights is not None else None
    blend = list(zip(prefixes, weights)) if weights is not None else prefixes
    return build_datasets(blend, tokenizer, seq_length=cfg.model.seq_length, seed=t.seed,
                          train_samples=resume.data_offset + t.train_iters * t.global_batch_size,
                          valid_samples=t.eval_samples, split=cfg.data.split, cache_dir=cfg.data.cache_dir)


def build_callbacks(cfg: RunConfig, module: TrainModule, tokenizer: Tokenizer, setup: ProcessSetup,
                    resume: ResumePoint) -> list[Callback]:
    """The built-in callbacks, each on by its own settings (downstream evaluation with eval.tasks), then
    train.callbacks ('package.module:name', called with the config)."""
    downstream = None
    if cfg.get("eval") and cfg.eval.tasks:   # lm-eval tasks (jtok_train/evaluation/in_loop.py)
        from jtok_train.evaluation.in_loop import DownstreamEvaluator   # lazy: cost (lm_eval, seconds)

        downstream = DownstreamEvaluator(cfg, module.model, tokenizer, setup.device)
    last_saved = int(resume.meta["step"]) if resume.meta is not None else None
    return default_callbacks(last_saved, downstream) + [_own_callback(cfg, c) for c in cfg.train.callbacks]


def _own_callback(cfg: RunConfig, spec: str) -> Callback:
    mod, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"train.callbacks: {spec!r} cannot be imported ({type(e).__name__}: {e}); give "
                          "'package.module:name' of an importable callable") from None
    cb = factory(cfg)
    if not isinstance(cb, Callback):
        raise ConfigError(f"train.callbacks: {spec!r} returned {type(cb).__name__}, not a "
                          "jtok_train.training.callbacks.Callback")
    return cb


def build_trainer(cfg: RunConfig, param_init: Any = None) -> "Trainer":
    """Every part of a run, built in order (the tokenizer, this process's setup, the resume point, the data,
    the train module with its model and optimizers, the callbacks), handed to a Trainer. ``param_init``:
    optional callable(model) applied after wrapping, before the optimizer is built (tests use it to give
    every parallel layout the same weights)."""
    preemption = PreemptionFlag()     # first: a SIGTERM while the run is being built still saves and requeues
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    setup = setup_process(cfg, tokenizer)
    resume = find_resume(cfg, setup, tokenizer)
    train_ds, valid_ds = build_data(cfg, tokenizer, resume)
    module = TrainModule(cfg, setup.device, setup.num_micro, setup.dp_size, param_init)
    callbacks = build_callbacks(cfg, module, tokenizer, setup, resume)
    return Trainer(cfg, setup=setup, tokenizer=tokenizer, resume=resume, train_ds=train_ds, valid_ds=valid_ds,
                   module=module, callbacks=callbacks, preemption=preemption)


class Trainer:
    """The loop over a run's parts, built outside (``build_trainer`` assembles them from a config): it loads
    the resume point's checkpoint into the module, then ``fit`` runs the steps and the callbacks."""

    def __init__(self, cfg: RunConfig, *, setup: ProcessSetup, tokenizer: Tokenizer, resume: ResumePoint,
                 train_ds: Any, valid_ds: Any, module: TrainModule, callbacks: list[Callback],
                 preemption: PreemptionFlag | None = None):
        self.cfg, self.setup, self.tokenizer, self.module, self.callbacks = cfg, setup, tokenizer, module, callbacks
        self.rank, self.world, self.threads, self.device = setup.rank, setup.world, setup.threads, setup.device
        self.dp_rank, self.dp_size = setup.dp_rank, setup.dp_size
        self.num_micro, self.num_valid_micro = setup.num_micro, setup.num_valid_micro
        self.train_ds, self.valid_ds = train_ds, valid_ds
        self.run_dir = Path(cfg.train.run_dir)
        self.preemption = preemption if preemption is not None else PreemptionFlag()
        self.resume_path, self.resume_meta = resume.path, resume.meta
        self.data_offset, self.data_fingerprint = resume.data_offset, resume.data_fingerprint
        self.start_step, self.skipped_steps, self.wandb_run_id = 0, 0, None
        if self.resume_path is not None:
            self._load(self.resume_path)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        meta = load_checkpoint(self, path)
        self.start_step = int(meta["step"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.wandb_run_id = meta.get("wandb_run_id")
        if self.rank == 0:
            note = "" if meta["world_size"] == self.world else (
                f" (saved on {meta['world_size']} ranks, now {self.world}: RNG streams restart from the seed)")
            print(f"resumed from {path} at step {self.start_step}, {meta['consumed_samples']} consumed samples"
                  + note, flush=True)

    def checkpoint_components(self) -> dict[str, Any]:
        """Stateful parts outside the model and Megatron's optimizer (the train module's)."""
        return self.module.checkpoint_components()

    # what checkpoints, tests and tools read of the model and its optimizers (the train module's)
    model = property(lambda self: self.module.model)
    unwrapped = property(lambda self: self.module.unwrapped)
    chunks = property(lambda self: self.module.chunks)
    unwrapped_chunks = property(lambda self: self.module.unwrapped_chunks)
    optimizer = property(lambda self: self.module.optimizer)
    scheduler = property(lambda self: self.module.scheduler)
    tconfig = property(lambda self: self.module.tconfig)

    # -- batches -------------------------------------------------------------------------------------
    def _train_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of optimizer step ``step``, checked against the vocabulary."""
        t = self.cfg.train
        if self.cfg.data.loader == "dali":  # the same samples in the same order, through a DALI pipeline
            return [self._check_ids(b) for b in self._dali_loader(step).batches(step)]
        batches = [
            self._check_ids(get_microbatch(self.train_ds, microbatch_indices(
                step, k, self.dp_rank, self.dp_size, t.micro_batch_size, t.global_batch_size, self.data_offset)))
            for k in range(self.num_micro)
        ]
        return batches

    def _dali_loader(self, step: int):
        if getattr(self, "_dali", None) is None:
            from jtok_train.data.dali import DaliTrainLoader   # lazy: optional (nvidia-dali)

            t = self.cfg.train
            self._dali = DaliTrainLoader(self.train_ds, micro_batch_size=t.micro_batch_size,
                                         global_batch_size=t.global_batch_size, dp_rank=self.dp_rank,
                                         dp_size=self.dp_size, start_step=step, end_step=t.train_iters,
                                         data_offset=self.data_offset, device=self.device)
        return self._dali

    def _check_ids(self, batch: dict) -> dict:
        """Token ids must index the tables: a clear error instead of an index error deep in a kernel.
        All ranks agree on the outcome, so a bad sample on one rank cannot leave the others hanging in a
        collective."""
        vocab = self.cfg.model.vocab_size
        bad = batch["tokens"][(batch["tokens"] < 0) | (batch["tokens"] >= vocab)]
        flag = torch.tensor([1.0 if bad.numel() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            where = f"token id {int(bad[0])}" if bad.numel() else "a token id (on another rank)"
            raise DataFileError(f"{where} outside the vocabulary [0, {vocab}) in the training data "
                                f"{list(self.cfg.data.prefixes)}: rebuild the data with this tokenizer or set "
                                "model.vocab_size")
        return batch

    def _valid_batches(self) -> Iterator[dict]:
        """The first eval_samples validation sequences, split over ranks like a training batch."""
        t = self.cfg.train
        for k in range(self.num_valid_micro):
            idx = microbatch_indices(0, k, self.dp_rank, self.dp_size, t.micro_batch_size, t.eval_samples)
            yield get_microbatch(self.valid_ds, idx)

    # -- loop ----------------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        if self.valid_ds is None:
            return None
        return self.module.evaluate(list(self._valid_batches()))

    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        G = t.global_batch_size
        result = TrainResult()
        start = self.start_step
        kw = {"run_id": self.wandb_run_id} if "run_id" in inspect.signature(MetricsLogger).parameters else {}
        self.logger = MetricsLogger(cfg, self.run_dir, t.train_iters, start, self.rank == 0,
                                    model=self.unwrapped_chunks, **kw)
        # the W&B run id goes into every checkpoint (rank 0 knows it; the common state must agree)
        ids = [None] * self.world
        dist.all_gather_object(ids, getattr(self.logger, "run_id", None) or self.wandb_run_id)
        self.wandb_run_id = ids[0]
        peak = mfu_peak_tflops(t.peak_tflops)     # None: no MFU (CPU, or a GPU of unknown peak)
        callbacks = self.callbacks
        tokens_per_step = G * cfg.model.seq_length
        self.module.train()
        timer = StepTimer()
        t_start = time.perf_counter()
        for step in range(start, t.train_iters):
            outcome = self.module.train_step(self._train_batches(step))
            for cb in callbacks:
                cb.on_step_outcome(self, step, outcome)
            dt = timer.lap()
            done = step + 1
            result.losses.append(outcome.loss)
            tps = tokens_per_step / dt
            metrics = {
                "loss": outcome.loss,
                "lr": self.module.lr,
                "grad_norm": float(outcome.grad_norm) if outcome.grad_norm is not None else float("nan"),
                "tokens_per_s": tps,
                "step_time_s": dt,
                "consumed_samples": self.data_offset + done * G,
                "skipped_steps": self.skipped_steps,
            }
            if peak is not None:
                metrics["mfu"] = self.module.flops_per_token * tps / (self.world * peak * 1e12)
                metrics["mfu_peak_tflops"] = peak
            metrics.update(self.module.step_metrics(done))
            result.final_metrics = metrics
            for cb in callbacks:
                cb.on_step_end(self, done, metrics)
        steps_run = t.train_iters - start
        result.wall_s = time.perf_counter() - t_start
        result.steps = steps_run
        result.tokens_per_s = tokens_per_step * steps_run / result.wall_s if steps_run else 0.0
        for cb in callbacks:
            cb.on_fit_end(self, result)
        for cb in callbacks:
            cb.on_close(self, result)
        if self.rank == 0:
            final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
            msg = (
                f"done: {t.train_iters} steps ({steps_run} in this process) in {result.wall_s:.1f}s, final train "
                f"loss {final}, validation loss "
                f"{result.valid_loss if result.valid_loss is None else round(result.valid_loss, 4)}, "
                f"{result.tokens_per_s:,.0f} tokens/s"
            )
            print(msg + (f", checkpoint {result.checkpoint}" if result.checkpoint else ""), flush=True)
        return result

    def checkpoint_path(self, step: int) -> Path:
        return checkpoint_dir(self.run_dir, step)

    def save(self, step: int) -> str:
        """Save the full training state after ``step`` optimizer steps (collective)."""
        path = save_checkpoint(self, step, consumed_samples=self.data_offset + step * self.cfg.train.global_batch_size,
                               extra_meta={"skipped_steps": self.skipped_steps, "wandb_run_id": self.wandb_run_id})
        return str(path)


def train(cfg: RunConfig) -> TrainResult:
    """Build a Trainer for ``cfg`` and run it."""
    return build_trainer(cfg).fit()
