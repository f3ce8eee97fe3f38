"""The training loop, driven through Megatron-Core: its DDP, its forward/backward schedule and its
optimizer. The trainer knows nothing of the table layout: it builds the model, feeds micro-batches
and steps the optimizer.

Batch order (independent of the number of ranks): optimizer step k consumes global samples
[k*G, (k+1)*G); micro-step i of data-parallel rank r takes the m samples starting at
k*G + i*m*W + r*m (``jtok_train.data.datasets.microbatch_indices``).
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from functools import partial
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
        from jtok_train.training.checkpoint import data_fingerprint, read_meta, resolve_resume_path
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
        from jtok_train.training.checkpoint import load_checkpoint

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
        """Stateful parts outside the model and Megatron's optimizer (see jtok_train/training/checkpoint.py):
        name -> object with sharded_state_dict(prefix) and load_state_dict(state). Model chunk v > 0
        (interleaved stages) adds its table optimizer as table_optimizer_vp{v}: the same global keys as
        chunk 0's (each chunk holds other layers of the same [V, L, ...] tensors)."""
        from jtok_train.parallel.table_optimizer import ChunkTableOptimizerState

        out: dict[str, Any] = {}
        for v, opt in enumerate(self.table_opts):
            if opt is not None:
                out["table_optimizer" if v == 0 else f"table_optimizer_vp{v}"] = \
                    opt if v == 0 else ChunkTableOptimizerState(opt, self.table_opts[0])
        return out

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
        """This rank's model chunks (one, or one per virtual stage with interleaved pipeline stages), each in
        Megatron's DDP (and Float16Module for bf16), Megatron's optimizer over all of them, and the sharded
        tables' own optimizer per chunk. ``model`` / ``unwrapped`` / ``table`` / ``table_opt`` are chunk 0's
        (the only chunk without interleaving); ``chunks`` / ``unwrapped_chunks`` / ``tables`` / ``table_opts``
        list every chunk's."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.transformer.module import Float16Module

        from jtok_train.model.builder import build_model_chunks, build_transformer_config
        from jtok_train.training.optim import build_optimizer, build_scheduler

        cfg = self.cfg
        self.tconfig = build_transformer_config(cfg)
        self.unwrapped_chunks = build_model_chunks(cfg, self.tconfig)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.chunks = []
        for v, model in enumerate(self.unwrapped_chunks):
            model.to(self.device)
            if cfg.train.precision == "bf16":
                model = Float16Module(self.tconfig, model)
            # as Megatron's training loop: one gradient bucket for the chunks after the first
            self.chunks.append(DistributedDataParallel(self.tconfig, ddp_config, model, disable_bucketing=v > 0))
        self.model, self.unwrapped = self.chunks[0], self.unwrapped_chunks[0]
        if self.param_init is not None:
            for chunk in self.chunks:
                self.param_init(chunk)
        self.optimizer = build_optimizer(cfg, self.chunks)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        # A table provider with its own optimizer (sharded tables) is stepped next to Megatron's.
        self.tables = [getattr(m, "token_table", None) for m in self.unwrapped_chunks]
        self.table_opts = []
        for table in self.tables:
            opt = None
            if getattr(table, "has_own_optimizer", False):
                from jtok_train.parallel.table_optimizer import ShardedTableOptimizer

                t = cfg.train
                opt = ShardedTableOptimizer(table, cfg.jtok.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps,
                                            cfg.jtok.table_optimizer)
            self.table_opts.append(opt)
        self.table, self.table_opt = self.tables[0], self.table_opts[0]
        self.own_tables = [(tb, opt) for tb, opt in zip(self.tables, self.table_opts) if opt is not None]
        if len(self.chunks) == 1:
            self.tconfig.no_sync_func = self.model.no_sync
        else:
            self.tconfig.no_sync_func = [chunk.no_sync for chunk in self.chunks]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        from jtok_train.model.accounting import flops_per_token, formula_params

        self.flops_per_token = flops_per_token(cfg, formula_params(cfg))

    # -- batches -------------------------------------------------------------------------------------
    def _with_prefetch(self, batches: list[dict], table: Any = None) -> Iterator[dict]:
        """Yield micro-batches; when micro-batch i is handed to the schedule, the table provider has
        already been told about micro-batch i+1, so its row exchange runs while i computes."""
        prefetch = getattr(table if table is not None else self.table, "prefetch", None)

        def host(tokens):   # the exchange plans on the host ids (a device batch, e.g. DALI's, is read back)
            return tokens if tokens.device.type == "cpu" else tokens.cpu()

        if prefetch is not None and batches:
            prefetch(host(batches[0]["tokens"]))
        for i, batch in enumerate(batches):
            if prefetch is not None and i + 1 < len(batches):
                prefetch(host(batches[i + 1]["tokens"]))
            yield batch

    def _feed(self, batches: list[dict]) -> "Iterator[dict] | list[Iterator[dict]]":
        """The schedule's data iterator: with interleaved stages every model chunk runs every micro-batch, in
        order, so each chunk gets its own iterator over the same batches, prefetching its own table's rows."""
        if len(self.chunks) == 1:
            return self._with_prefetch(batches)
        return [self._with_prefetch(batches, table) for table in self.tables]

    def _train_batches(self, step: int) -> Iterator[dict]:
        from jtok_train.data.datasets import get_microbatch, microbatch_indices

        t = self.cfg.train
        if self.cfg.data.loader == "dali":  # the same samples in the same order, through a DALI pipeline
            return self._feed([self._check_ids(b) for b in self._dali_loader(step).batches(step)])
        batches = [
            self._check_ids(get_microbatch(self.train_ds, microbatch_indices(
                step, k, self.dp_rank, self.dp_size, t.micro_batch_size, t.global_batch_size, self.data_offset)))
            for k in range(self.num_micro)
        ]
        return self._feed(batches)

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

    def _forward_step(self, data_iterator, model):
        from jtok_train.compat.megatron import set_aux_loss_scale

        batch = next(data_iterator)
        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        loss_mask = batch["loss_mask"].to(self.device)
        position_ids = batch["position_ids"].to(self.device)
        if self.tconfig.num_moe_experts is None and self.cfg.jtok.variant == "jtokm":
            # Megatron sets this scale only for MoE backbones; JTok-M's aux loss uses the same mechanism.
            set_aux_loss_scale(torch.ones(1, device=self.device) / self.num_micro)
        output = model(tokens, position_ids, None, labels=labels)

        def loss_func(output_tensor):
            per_token = output_tensor.float()
            loss = torch.sum(per_token * loss_mask) / loss_mask.sum().clamp(min=1)
            # The schedule divides the returned loss in place: log a copy.
            return loss, {"lm_loss": loss.detach().clone()}

        return output, loss_func

    def _run_schedule(self, batches: "Iterator[dict] | list[Iterator[dict]]", num_micro: int, forward_only: bool) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.cfg.train
        outs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=batches,
            model=self.chunks,
            num_microbatches=num_micro,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )
        local = torch.stack([o["lm_loss"] for o in outs]).mean() if outs else torch.zeros(())
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() > 1:   # only the last stage has the loss: the others add 0
            dist.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(local, group=ps.get_data_parallel_group())
        return float(local) / self.dp_size

    def _optimizer_step(self) -> tuple[bool, float | None]:
        """Megatron's optimizer step, in its own pieces (prepare_grads, get_grad_norm, clipping by the total
        norm, step_with_ready_grads: what ChainedOptimizer.step does), so that (1) with sharded tables the
        table's gradient joins the global norm (one clipping coefficient for backbone and tables, as an
        unsharded model computes it) and (2) a non-finite gradient norm under a finite loss (bf16 has no loss
        scaler, so Megatron's found-inf check never fires) is seen before anything is applied.
        Returns (applied, total grad norm); nothing is applied when the gradients are not finite."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        t, j = self.cfg.train, self.cfg.jtok
        for table, _ in self.own_tables:
            table.finish_backward()
        if self.optimizer.prepare_grads():      # Megatron's found-inf (fp16 loss scaler)
            return False, float("nan")
        norm_sq = float(self.optimizer.get_grad_norm()) ** 2
        for table, _ in self.own_tables:
            norm_sq += table.grad_norm_sq()
        total = math.sqrt(norm_sq)
        if not math.isfinite(total):          # the norm is reduced over ranks: every rank takes this branch
            return False, total
        if t.clip_grad > 0:
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                params = opt.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, max_norm=t.clip_grad, total_norm=total)
            coeff = t.clip_grad / (total + 1.0e-6)
            if coeff < 1.0:
                for table, _ in self.own_tables:
                    table.scale_grad(coeff)
        ok = self.optimizer.step_with_ready_grads()
        for _, opt in self.own_tables:
            opt.step(lr=self.scheduler.get_lr({"max_lr": t.lr * j.lr_mult, "min_lr": t.min_lr * j.lr_mult}))
        return ok, total

    # -- metrics -------------------------------------------------------------------------------------
    def _aux_metrics(self, step: int = 0) -> dict[str, float]:
        from jtok_train.compat.megatron import report_aux_losses

        # As Megatron's training log: each aux loss without its coefficient, averaged over micro-batches, data
        # parallel ranks and layers (the router's load_balancing_loss, JTok-M's jtokm_load_balancing_loss).
        out = {f"aux/{name}": v for name, v in
               report_aux_losses(1.0 / self.num_micro, step, self.cfg.model.num_layers).items()}
        loads = [l.last_load for m in self.unwrapped_chunks for l in m.decoder.layers
                 if getattr(l, "last_load", None) is not None]
        if loads:
            # router balance of JTok-M: max/mean of the share of assignments per row set (1 = even)
            imb = [float(f.max() / f.mean()) for f in loads]
            out["jtokm/load_imbalance_mean"] = sum(imb) / len(imb)
            for i, v in enumerate(imb):
                out[f"jtokm/load_imbalance_layer{i}"] = v
        return out

    # -- loop ----------------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        if self.valid_ds is None:
            return None
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            loss = self._run_schedule(self._feed(list(self._valid_batches())), self.num_valid_micro,
                                      forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        from jtok_train.compat.megatron import clear_aux_losses

        clear_aux_losses()
        return loss

    def fit(self) -> TrainResult:
        from jtok_train.training.metrics import MetricsLogger, StepTimer, peak_flops_per_rank

        from jtok_train.training.errors import NonFiniteLossError
        from jtok_train.training.signals import REQUEUE_EXIT_CODE, Preempted

        cfg, t = self.cfg, self.cfg.train
        G = t.global_batch_size
        result = TrainResult()
        start = self.start_step
        import inspect

        kw = {"run_id": self.wandb_run_id} if "run_id" in inspect.signature(MetricsLogger).parameters else {}
        logger = MetricsLogger(cfg, self.run_dir, t.train_iters, start, self.rank == 0, model=self.unwrapped_chunks, **kw)
        # the W&B run id goes into every checkpoint (rank 0 knows it; the common state must agree)
        ids = [None] * self.world
        dist.all_gather_object(ids, getattr(logger, "run_id", None) or self.wandb_run_id)
        self.wandb_run_id = ids[0]
        peak = peak_flops_per_rank(t.peak_flops, self.threads)
        downstream = None
        if cfg.get("eval") and cfg.eval.tasks:   # lm-eval tasks (jtok_train/evaluation/in_loop.py)
            from jtok_train.evaluation.in_loop import DownstreamEvaluator

            downstream = DownstreamEvaluator(cfg, self.model, self.tokenizer, self.device)
        tokens_per_step = G * cfg.model.seq_length
        for chunk in self.chunks:
            chunk.train()
        timer = StepTimer()
        t_start = time.perf_counter()
        last_saved = start if self.resume_path is not None else None
        metrics: dict[str, float] = {}
        for step in range(start, t.train_iters):
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            for table, _ in self.own_tables:
                table.zero_grad()
            loss = self._run_schedule(self._train_batches(step), self.num_micro, forward_only=False)
            # the loss and the grad norm are reduced over ranks: every rank takes the same branch
            ok, grad_norm = self._optimizer_step() if math.isfinite(loss) else (False, None)
            if not math.isfinite(loss):
                for table, _ in self.own_tables:
                    table.finish_backward()   # collect this step's row gradients: the next zero_grad drops them
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm} (loss {loss:.4f})"
            if ok:
                self.scheduler.step(increment=G)
            elif t.nan_policy == "skip":
                self.skipped_steps += 1
                logger.message(f"step {step + 1}: {what}, update skipped "
                               f"({self.skipped_steps} skipped so far; train.nan_policy=skip)")
            else:
                # nothing was applied yet: the current weights are those of the last good step
                path = self.save(step) if last_saved != step else str(self._ckpt_dir(step))
                logger.close()
                raise NonFiniteLossError(f"{what} at step {step + 1}: saved the last good step {step} to "
                                         f"{path}; lower train.lr, check the data, or set train.nan_policy=skip")
            dt = timer.lap()
            done = step + 1
            result.losses.append(loss)
            tps = tokens_per_step / dt
            metrics = {
                "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tps,
                "step_time_s": dt,
                "mfu": self.flops_per_token * tps / (self.world * peak),
                "consumed_samples": self.data_offset + done * G,
                "skipped_steps": self.skipped_steps,
            }
            metrics.update(self._aux_metrics(done))
            if self.own_tables:   # the exchange counters of every chunk's table, added
                stats = [table.pop_stats() for table, _ in self.own_tables]
                merged = {k: sum(s[k] for s in stats) for k in stats[0]}
                if "exchange/unique_ratio" in merged:
                    merged["exchange/unique_ratio"] = merged["exchange/unique_ids"] / max(1.0, merged["exchange/positions"])
                metrics.update(merged)
            if done % t.log_interval == 0 or done == t.train_iters:
                logger.log(done, metrics)
            if t.eval_interval and done % t.eval_interval == 0 and done < t.train_iters:
                vl = self.evaluate()
                logger.message(f"step {done}: validation loss {vl:.4f}")
                logger.log(done, {"valid_loss": vl}, advance=False)
            if downstream is not None and downstream.due(done) and done < t.train_iters:
                logger.log(done, downstream(), advance=False)
            if t.save_interval and done % t.save_interval == 0 and done < t.train_iters:
                self.save(done)
                last_saved = done
            result.final_metrics = metrics
            if self.preemption.agreed():
                path = self.save(done) if last_saved != done else str(self._ckpt_dir(done))
                if self.rank == 0:
                    (Path(path).parent / "REQUEUE").write_text(f"{Path(path).name}\n")
                logger.message(f"preempted: saved step {done} to {path}; exiting with code "
                               f"{REQUEUE_EXIT_CODE} so the job is requeued")
                logger.close()
                raise Preempted(f"preempted at step {done}, checkpoint {path}")
        steps_run = t.train_iters - start
        result.wall_s = time.perf_counter() - t_start
        result.steps = steps_run
        result.tokens_per_s = tokens_per_step * steps_run / result.wall_s if steps_run else 0.0
        result.valid_loss = self.evaluate()
        if result.valid_loss is not None:
            logger.log(t.train_iters, {"valid_loss": result.valid_loss}, advance=False)
        if downstream is not None:
            scores = downstream()
            result.final_metrics = {**result.final_metrics, **scores}
            logger.log(t.train_iters, scores, advance=False)
        logger.close()
        if t.save and last_saved != t.train_iters:
            result.checkpoint = self.save(t.train_iters)
        elif t.save:
            result.checkpoint = str(self._ckpt_dir(t.train_iters))
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

    def _ckpt_dir(self, step: int) -> Path:
        from jtok_train.training.checkpoint import checkpoint_dir

        return checkpoint_dir(self.run_dir, step)

    def save(self, step: int) -> str:
        """Save the full training state after ``step`` optimizer steps (collective)."""
        from jtok_train.training.checkpoint import save_checkpoint

        path = save_checkpoint(self, step, consumed_samples=self.data_offset + step * self.cfg.train.global_batch_size,
                               extra_meta={"skipped_steps": self.skipped_steps, "wandb_run_id": self.wandb_run_id})
        return str(path)


def train(cfg: Any) -> TrainResult:
    """Build a Trainer for ``cfg`` and run it."""
    return Trainer(cfg).fit()
