"""Optimizer and LR schedule: Megatron-Core's optimizer (AdamW, grad clipping, mixed precision) and
its OptimizerParamScheduler (cosine, warmup-stable-decay). The token tables get their own parameter
group (LR multiplier and weight decay of ``jtok.*``)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from jtok_train.config import ConfigError, RunConfig

__all__ = ["build_optimizer", "build_scheduler", "table_group_overrides", "JointOptimizer"]


def table_group_overrides(cfg: RunConfig, opt_config: OptimizerConfig) -> dict:
    """Megatron's standard overrides (no weight decay on norms and biases) + the token-table group."""
    overrides = dict(get_standard_config_overrides(config=opt_config))
    j, t = cfg.jtok, cfg.train
    if j.variant != "none":
        if t.weight_decay == 0 and j.weight_decay != 0:
            raise ConfigError(
                f"jtok.weight_decay={j.weight_decay} needs train.weight_decay > 0 (Megatron scales decay per "
                "group); set train.weight_decay or jtok.weight_decay=0"
            )
        wd_mult = j.weight_decay / t.weight_decay if t.weight_decay else 0.0
        overrides[ParamKey(attr="jtok_table")] = {
            "max_lr": t.lr * j.lr_mult,
            "min_lr": t.min_lr * j.lr_mult,
            "wd_mult": wd_mult,
        }
        if j.scale_lr_mult != 1.0:
            # the scales s_l are 1-D, so the standard overrides already give them no weight decay; Megatron
            # combines the two overrides. At 1 no group is added: checkpoints keep the groups they had.
            overrides[ParamKey(attr="jtok_scale")] = {"max_lr": t.lr * j.scale_lr_mult,
                                                      "min_lr": t.min_lr * j.scale_lr_mult}
    return overrides


def build_optimizer(cfg: RunConfig, model: "torch.nn.Module | list[torch.nn.Module]"):
    """Megatron's optimizer over the model, or over its chunks (interleaved pipeline stages)."""
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",            # Megatron's "adam" is AdamW (decoupled weight decay)
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.precision == "bf16",
        params_dtype=torch.bfloat16 if t.precision == "bf16" else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return get_megatron_optimizer(opt_config, chunks, config_overrides=table_group_overrides(cfg, opt_config))


def build_scheduler(cfg: RunConfig, optimizer) -> OptimizerParamScheduler:
    """Schedules counted in samples (Megatron's convention), so they survive a change of batch layout."""
    t = cfg.train
    total = t.train_iters * t.global_batch_size
    warmup = int(round(t.warmup_fraction * t.train_iters)) * t.global_batch_size
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[t.lr_schedule]
    kw: dict[str, Any] = {}
    if style == "WSD":
        kw = dict(
            wsd_decay_steps=max(1, int(round(t.wsd_decay_fraction * t.train_iters))) * t.global_batch_size,
            lr_wsd_decay_style=t.wsd_decay_style,
        )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        **kw,
    )


class JointOptimizer:
    """Megatron's optimizer and the sharded tables' optimizers, stepped as one: one gradient norm over both, one
    clipping coefficient, one decision to skip (what Megatron's ChainedOptimizer does for its own optimizers,
    which cannot hold a table whose gradient arrives through the exchange). The training loop calls
    ``zero_grad``, ``finish_backward`` and ``step`` and never touches a table.

    ``tables``: objects with finish_backward / zero_grad / grad_norm_sq / scale_grad / step(lr)
    (``jtok_train.tables.optimizer.ShardedTableOptimizer``); ``table_lr()``: their learning rate this step."""

    def __init__(self, optimizer: Any, tables: Sequence[Any], clip_grad: float, table_lr: Callable[[], float]):
        self.optimizer, self.tables, self.clip_grad, self.table_lr = optimizer, list(tables), clip_grad, table_lr

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        for t in self.tables:
            t.zero_grad()

    def finish_backward(self) -> None:
        """Collect the step's row gradients (also on a step that is then skipped: the next zero_grad drops them)."""
        for t in self.tables:
            t.finish_backward()

    def step(self) -> tuple[bool, float]:
        """Megatron's optimizer step in its own pieces (prepare_grads, get_grad_norm, clipping by the total
        norm, step_with_ready_grads), so that (1) the tables' gradient joins the global norm (one clipping
        coefficient for backbone and tables, as an unsharded model computes it) and (2) a non-finite norm
        under a finite loss (bf16 has no loss scaler, so Megatron's found-inf check never fires) is seen before
        anything is applied. Returns (applied, total grad norm); nothing is applied when it is not finite."""
        self.finish_backward()
        if self.optimizer.prepare_grads():      # Megatron's found-inf (fp16 loss scaler)
            return False, float("nan")
        norm_sq = float(self.optimizer.get_grad_norm()) ** 2
        for t in self.tables:
            norm_sq += t.grad_norm_sq()
        total = math.sqrt(norm_sq)
        if not math.isfinite(total):          # the norm is reduced over ranks: every rank takes this branch
            return False, total
        if self.clip_grad > 0:
            for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                params = opt.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, max_norm=self.clip_grad, total_norm=total)
            coeff = self.clip_grad / (total + 1.0e-6)
            if coeff < 1.0:
                for t in self.tables:
                    t.scale_grad(coeff)
        ok = self.optimizer.step_with_ready_grads()
        if self.tables:
            lr = self.table_lr()
            for t in self.tables:
                t.step(lr=lr)
        return ok, total
