"""Optimizer and LR schedule: Megatron-Core's optimizer (AdamW, grad clipping, mixed precision) and
its OptimizerParamScheduler (cosine, warmup-stable-decay). The token tables get their own parameter
group (LR multiplier and weight decay of ``jtok.*``)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from jtok_train.config import ConfigError

__all__ = ["build_optimizer", "build_scheduler", "table_group_overrides"]


def table_group_overrides(cfg: Any, opt_config: OptimizerConfig) -> dict:
    """Megatron's standard overrides (no weight decay on norms and biases) + the token-table group."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

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
    return overrides


def build_optimizer(cfg: Any, model: "torch.nn.Module | list[torch.nn.Module]"):
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


def build_scheduler(cfg: Any, optimizer) -> OptimizerParamScheduler:
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
