"""The train module (OLMo-core's split of trainer and train module): it owns the model chunks, Megatron's DDP,
the optimizers and the LR schedule, and runs one step on the micro-batches it is given. The loop
(``trainer.py``) decides what to feed and when; it never sees a table, a shard or a gradient.

- model: this rank's chunks (one, or one per virtual stage with interleaved pipeline stages), with the
  configured embedding parallelism (``jtok_train.parallel.parallelize``), each in Megatron's DDP (and
  Float16Module for bf16);
- optimizers: Megatron's over all chunks and the sharded tables' own, chained (``JointOptimizer``: one norm,
  one clip, one step);
- the schedule: Megatron's forward/backward function, with each chunk's table told one micro-batch ahead
  (``prefetch``) so that its row exchange runs while the previous micro-batch computes.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from jtok_train.compat.megatron import clear_aux_losses, report_aux_losses, set_aux_loss_scale
from jtok_train.config import RunConfig
from jtok_train.data.counts import hot_token_ids
from jtok_train.model.builder import build_transformer_config, token_table_of
from jtok_train.parallel.parallelize import build_parallel_model_chunks
from jtok_train.planning.formulas import flops_per_token, formula_params
from jtok_train.tables.optimizer import ChunkTableOptimizerState, ShardedTableOptimizer
from jtok_train.tables.rows import check_provider
from jtok_train.training.optim import JointOptimizer, build_optimizer, build_scheduler

__all__ = ["TrainModule", "StepOutcome"]


class StepOutcome:
    """One training step: the global mean loss, whether the update was applied, the total gradient norm."""

    def __init__(self, loss: float, applied: bool, grad_norm: float | None):
        self.loss, self.applied, self.grad_norm = loss, applied, grad_norm


class TrainModule:
    """``param_init``: optional callable(model chunk) applied after wrapping, before the optimizer is built
    (tests use it to give every parallel layout the same weights)."""

    def __init__(self, cfg: RunConfig, device: torch.device, num_micro: int, dp_size: int, param_init: Any = None):
        self.cfg, self.device, self.num_micro, self.dp_size = cfg, device, num_micro, dp_size
        self.tconfig = build_transformer_config(cfg)
        hot_ids = None
        if cfg.parallel.hot_rows:   # the most frequent ids' rows, replicated on every rank of the group
            p = cfg.parallel
            hot_ids = hot_token_ids(list(cfg.data.prefixes), p.hot_rows, cfg.model.vocab_size, p.hot_rows_file)
        self.unwrapped_chunks = build_parallel_model_chunks(cfg, self.tconfig, device, hot_ids=hot_ids)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.chunks = []
        for v, model in enumerate(self.unwrapped_chunks):
            model.to(device)
            if cfg.train.precision == "bf16":
                model = Float16Module(self.tconfig, model)
            # as Megatron's training loop: one gradient bucket for the chunks after the first
            self.chunks.append(DistributedDataParallel(self.tconfig, ddp_config, model, disable_bucketing=v > 0))
        self.model, self.unwrapped = self.chunks[0], self.unwrapped_chunks[0]
        if param_init is not None:
            for chunk in self.chunks:
                param_init(chunk)
        self.optimizer = build_optimizer(cfg, self.chunks)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        # Every chunk's token-row provider (jtok_train.tables.rows.TokenRowProvider, checked: a provider missing
        # a member fails here in one line); one with its own optimizer (sharded tables) gets it here.
        t, j = cfg.train, cfg.jtok
        self.tables = [token_table_of(m) for m in self.unwrapped_chunks]
        for table in self.tables:
            if table is not None:
                check_provider(table)
        self.table_opts = [
            ShardedTableOptimizer(table, j.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps, j.table_optimizer)
            if table is not None and table.has_own_optimizer else None
            for table in self.tables
        ]
        self.table, self.table_opt = self.tables[0], self.table_opts[0]
        self.own_tables = [(tb, opt) for tb, opt in zip(self.tables, self.table_opts) if opt is not None]
        # The joint optimizer calls every provider's step hooks (zero_grad ... step); a provider whose rows are
        # model parameters has nothing to do in them (the replicated table's are no-ops).
        self.joint = JointOptimizer(
            self.optimizer, [tb for tb in self.tables if tb is not None], t.clip_grad,
            table_lr=lambda: self.scheduler.get_lr({"max_lr": t.lr * j.lr_mult, "min_lr": t.min_lr * j.lr_mult}))
        if len(self.chunks) == 1:
            self.tconfig.no_sync_func = self.model.no_sync
        else:
            self.tconfig.no_sync_func = [chunk.no_sync for chunk in self.chunks]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.flops_per_token = flops_per_token(cfg, formula_params(cfg))

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_components(self) -> dict[str, Any]:
        """Stateful parts outside the model and Megatron's optimizer (see jtok_train/checkpoint/): name ->
        object with sharded_state_dict(prefix) and load_state_dict(state). Model chunk v > 0 (interleaved
        stages) adds its table optimizer as table_optimizer_vp{v}: the same global keys as chunk 0's (each
        chunk holds other layers of the same [V, L, ...] tensors)."""
        out: dict[str, Any] = {}
        for v, opt in enumerate(self.table_opts):
            if opt is not None:
                out["table_optimizer" if v == 0 else f"table_optimizer_vp{v}"] = \
                    opt if v == 0 else ChunkTableOptimizerState(opt, self.table_opts[0])
        return out

    # -- the schedule --------------------------------------------------------------------------------
    def _with_prefetch(self, batches: list[dict], table: Any) -> Iterator[dict]:
        """Yield micro-batches; when micro-batch i is handed to the schedule, the table provider (None: a model
        without JTok) has already been told about micro-batch i+1 (its host ids: a provider that exchanges rows
        plans on them), so its row exchange runs while i computes."""
        if table is not None and batches:
            table.prefetch(batches[0]["tokens"])
        for i, batch in enumerate(batches):
            if table is not None and i + 1 < len(batches):
                table.prefetch(batches[i + 1]["tokens"])
            yield batch

    def feed(self, batches: list[dict]) -> "Iterator[dict] | list[Iterator[dict]]":
        """The schedule's data iterator: with interleaved stages every model chunk runs every micro-batch, in
        order, so each chunk gets its own iterator over the same batches, prefetching its own table's rows."""
        if len(self.chunks) == 1:
            return self._with_prefetch(batches, self.table)
        return [self._with_prefetch(batches, table) for table in self.tables]

    def _forward_step(self, data_iterator, model):
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

    def run_schedule(self, batches: list[dict], forward_only: bool) -> float:
        """Megatron's forward(/backward) schedule over ``batches`` (this rank's micro-batches); returns the
        loss averaged over micro-batches and data-parallel ranks (every rank gets it)."""
        t = self.cfg.train
        outs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=self.feed(batches),
            model=self.chunks,
            num_microbatches=len(batches),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )
        local = torch.stack([o["lm_loss"] for o in outs]).mean() if outs else torch.zeros(())
        if ps.get_pipeline_model_parallel_world_size() > 1:   # only the last stage has the loss: the others add 0
            dist.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(local, group=ps.get_data_parallel_group())
        return float(local) / self.dp_size

    def train_step(self, batches: list[dict]) -> StepOutcome:
        """Zero the gradients, forward and backward over ``batches``, then the joint optimizer step (skipped,
        with nothing applied, when the loss or the gradient norm is not finite: both are reduced over ranks,
        so every rank decides the same). The LR schedule advances only on an applied step."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.joint.zero_grad()
        loss = self.run_schedule(batches, forward_only=False)
        if not math.isfinite(loss):
            self.joint.finish_backward()   # collect this step's row gradients: the next zero_grad drops them
            return StepOutcome(loss, False, None)
        ok, norm = self.joint.step()
        if ok:
            self.scheduler.step(increment=self.cfg.train.global_batch_size)
        return StepOutcome(loss, ok, norm)

    def evaluate(self, batches: list[dict]) -> float:
        """The mean loss over ``batches`` without gradients (the chunks go back to training mode after)."""
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            loss = self.run_schedule(batches, forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        clear_aux_losses()
        return loss

    def train(self) -> None:
        for chunk in self.chunks:
            chunk.train()

    # -- metrics -------------------------------------------------------------------------------------
    def step_metrics(self, step: int) -> dict[str, float]:
        """The model's own metrics of the last step: aux losses, JTok-M's router balance, the exchange."""
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
        out.update(self._effect_metrics())
        stats = [st for tb in self.tables if tb is not None and (st := tb.pop_stats())]
        if stats:   # the exchange counters of every chunk's table, added
            merged = {k: sum(s[k] for s in stats) for k in stats[0]}
            if "exchange/unique_ratio" in merged:
                merged["exchange/unique_ratio"] = merged["exchange/unique_ids"] / max(1.0, merged["exchange/positions"])
            out.update(merged)
        return out

    def _effect_metrics(self) -> dict[str, float]:
        """What the parallel and memory settings did, read from the objects they built (so a setting that the
        config accepts but nothing applies shows): the share of this rank's backbone parameters whose Adam
        moments it holds (1 with Megatron's plain optimizer, about 1/DP with the distributed one), the expert
        parallel group's size, the share of model weights held in bf16, the layers replayed by full recompute in
        this step, and the table rows its own optimizer updated (all rows for adamw, the touched ones for
        sparse_adamw)."""
        if not hasattr(self, "_setup_facts"):
            opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
            held = sum(v.numel() for o in opts for st in getattr(o, "optimizer", o).state.values()
                       for k, v in st.items() if k == "exp_avg")
            params = [p for c in self.chunks for p in c.parameters()]
            n = sum(p.numel() for p in params)
            self._setup_facts = {
                "setup/optimizer_state_share": held / max(1, n),
                "setup/expert_parallel_size": float(ps.get_expert_model_parallel_world_size()),
                "setup/bf16_weight_share": sum(p.numel() for p in params if p.dtype == torch.bfloat16) / max(1, n),
            }
            self._replays_before = 0
        replays = sum(getattr(l, "replays", 0) for m in self.unwrapped_chunks for l in m.decoder.layers)
        out = dict(self._setup_facts)
        out["recompute/replayed_layers"] = float(replays - self._replays_before)
        self._replays_before = replays
        if self.own_tables:
            out["table_opt/rows_stepped"] = float(sum(opt.rows_stepped for _, opt in self.own_tables))
        return out

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
