"""The training loop and its cadence. What a step does is the train module's (``train_module.py``: model,
Megatron's DDP, schedule and the chained optimizers); what happens around the steps is the callbacks'
(``callbacks.py``: metrics, validation, downstream evaluation, checkpoints, preemption, the non-finite policy).
The trainer owns the process setup, the data and the order of things; it knows nothing of the table layout.

Batch order (independent of the number of ranks): optimizer step k consumes global samples
[k*G, (k+1)*G); micro-step i of data-parallel rank r takes the m samples starting at
k*G + i*m*W + r*m (``jtok_train.data.datasets.microbatch_indices``).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from jtok_train.compat import device as compute_device
from jtok_train.compat import init_distributed, init_model_parallel

__all__ = ["Trainer", "TrainResult", "train"]


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


def _set_threads(cfg: Any) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, local))
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    return threads


class Trainer:
    """``param_init``: optional callable(model) applied after wrapping, before the optimizer is built
    (tests use it to give every parallel layout the same weights)."""

    def __init__(self, cfg: Any, param_init: Any = None):
        from megatron.core import parallel_state as ps

        from jtok_train.config import validate
        from jtok_train.data.tokenizer import load_tokenizer

        self.cfg = cfg
        self.param_init = param_init
        p, t = cfg.parallel, cfg.train
        self.threads = _set_threads(cfg)
        init_distributed(p.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        hosts = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname())    # which node each rank runs on, for the log
        if self.rank == 0:
            from jtok_train.compat.megatron import versions, warn_if_untested

            print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), flush=True)
            print(f"ranks: {self.world} on {len(set(hosts))} host(s): " + "; ".join(
                f"{h} {_ranges([r for r, x in enumerate(hosts) if x == h])}" for h in dict.fromkeys(hosts)), flush=True)
            warn_if_untested()
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        validate(cfg, world_size=self.world, tokenizer_vocab=self.tokenizer.vocab_size)
        from jtok_train.model.builder import virtual_stages

        vpp = virtual_stages(cfg)
        init_model_parallel(
            tp=p.tensor_model_parallel_size,
            pp=p.pipeline_model_parallel_size,
            ep=p.expert_model_parallel_size,
            etp=p.expert_tensor_parallel_size,
            seed=t.seed,
            **({"virtual_pipeline_model_parallel_size": vpp} if vpp > 1 else {}),
        )
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        from jtok_train.data.datasets import num_microbatches

        self.num_micro = num_microbatches(t.global_batch_size, t.micro_batch_size, self.dp_size)
        self.num_valid_micro = num_microbatches(t.eval_samples, t.micro_batch_size, self.dp_size)
        self.device = compute_device()
        from jtok_train.compat.megatron import clear_aux_losses

        # Megatron's aux-loss tracker is process-global and sized by the first model's layer count.
        clear_aux_losses(reset=True)
        self.run_dir = Path(t.run_dir)
        self._prepare_resume()
        self._build_data()
        self._build_model()
        if self.resume_path is not None:
            self._load(self.resume_path)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _prepare_resume(self) -> None:
        """Find the checkpoint to resume from (train.resume_from, else the run's latest with
        train.auto_resume) and read its data position before the datasets are sized."""
        from jtok_train.checkpoint import data_fingerprint, read_meta, resolve_resume_path
        from jtok_train.training.signals import PreemptionFlag

        t = self.cfg.train
        self.preemption = PreemptionFlag()
        import random

        import numpy as np

        random.seed(t.seed)            # Python's and numpy's global RNGs too: every checkpointed state is a
        np.random.seed(t.seed)         # function of the seed and the step
        self.data_fingerprint = data_fingerprint(self.cfg, self.tokenizer.sha256)
        self.start_step, self.skipped_steps, self.wandb_run_id = 0, 0, None
        # batch of step k = dataset samples [data_offset + k*G, data_offset + (k+1)*G): a resume at another
        # global batch size continues from the checkpoint's consumed samples
        self.data_offset = 0
        self.resume_path = resolve_resume_path(self.cfg)
        if self.rank == 0:    # a restart clears the previous preemption's requeue marker
            (self.run_dir / "checkpoints" / "REQUEUE").unlink(missing_ok=True)
        self.resume_meta = read_meta(self.resume_path) if self.resume_path is not None else None
        if self.resume_meta is not None:
            m = self.resume_meta
            self.data_offset = int(m["consumed_samples"]) - int(m["step"]) * t.global_batch_size

    def _load(self, path: Path) -> None:
        from jtok_train.checkpoint import load_checkpoint

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

    # -- setup ---------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        from jtok_train.data.datasets import build_datasets

        cfg, t = self.cfg, self.cfg.train
        prefixes = list(cfg.data.prefixes)
        if not prefixes:
            from jtok_train.config import ConfigError

            raise ConfigError("data.prefixes is empty: build a dataset with `jtok-data build` and list its prefix")
        weights = list(cfg.data.weights) if cfg.data.weights is not None else None
        blend = list(zip(prefixes, weights)) if weights is not None else prefixes
        self.train_ds, self.valid_ds = build_datasets(
            blend,
            self.tokenizer,
            seq_length=cfg.model.seq_length,
            seed=t.seed,
            train_samples=self.data_offset + t.train_iters * t.global_batch_size,
            valid_samples=t.eval_samples,
            split=cfg.data.split,
            cache_dir=cfg.data.cache_dir,
        )

    def _build_model(self) -> None:
        from jtok_train.training.train_module import TrainModule

        self.module = TrainModule(self.cfg, self.device, self.num_micro, self.dp_size, self.param_init)

    # what checkpoints, tests and tools read of the model and its optimizers (the train module's)
    model = property(lambda self: self.module.model)
    unwrapped = property(lambda self: self.module.unwrapped)
    chunks = property(lambda self: self.module.chunks)
    unwrapped_chunks = property(lambda self: self.module.unwrapped_chunks)
    optimizer = property(lambda self: self.module.optimizer)
    scheduler = property(lambda self: self.module.scheduler)
    tconfig = property(lambda self: self.module.tconfig)
    table = property(lambda self: self.module.table)
    table_opt = property(lambda self: self.module.table_opt)
    tables = property(lambda self: self.module.tables)
    table_opts = property(lambda self: self.module.table_opts)
    own_tables = property(lambda self: self.module.own_tables)

    # -- batches -------------------------------------------------------------------------------------
    def _train_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of optimizer step ``step``, checked against the vocabulary."""
        from jtok_train.data.datasets import get_microbatch, microbatch_indices

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
            from jtok_train.data.dali import DaliTrainLoader

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
            from jtok_train.data.indexed import DataFileError

            where = f"token id {int(bad[0])}" if bad.numel() else "a token id (on another rank)"
            raise DataFileError(f"{where} outside the vocabulary [0, {vocab}) in the training data "
                                f"{list(self.cfg.data.prefixes)}: rebuild the data with this tokenizer or set "
                                "model.vocab_size")
        return batch

    def _valid_batches(self) -> Iterator[dict]:
        """The first eval_samples validation sequences, split over ranks like a training batch."""
        from jtok_train.data.datasets import get_microbatch, microbatch_indices

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
        import inspect

        from jtok_train.training.callbacks import default_callbacks
        from jtok_train.training.metrics import MetricsLogger, StepTimer, mfu_peak_tflops

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
        downstream = None
        if cfg.get("eval") and cfg.eval.tasks:   # lm-eval tasks (jtok_train/evaluation/in_loop.py)
            from jtok_train.evaluation.in_loop import DownstreamEvaluator

            downstream = DownstreamEvaluator(cfg, self.model, self.tokenizer, self.device)
        callbacks = default_callbacks(self, last_saved=start if self.resume_path is not None else None,
                                      downstream=downstream)
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
        from jtok_train.checkpoint import checkpoint_dir

        return checkpoint_dir(self.run_dir, step)

    def save(self, step: int) -> str:
        """Save the full training state after ``step`` optimizer steps (collective)."""
        from jtok_train.checkpoint import save_checkpoint

        path = save_checkpoint(self, step, consumed_samples=self.data_offset + step * self.cfg.train.global_batch_size,
                               extra_meta={"skipped_steps": self.skipped_steps, "wandb_run_id": self.wandb_run_id})
        return str(path)


def train(cfg: Any) -> TrainResult:
    """Build a Trainer for ``cfg`` and run it."""
    return Trainer(cfg).fit()
