"""What a checkpoint holds of a trainer, as one sharded state dict:

``model`` (Megatron's model sharded_state_dict: backbone and replicated JTok tables; with interleaved pipeline
stages model chunk v > 0 adds ``model_vp{v}``, whose keys are global like chunk 0's, so a checkpoint reshards
between layouts with and without virtual stages), ``optimizer`` (Megatron's optimizer, all states),
``extra.<name>`` (pluggable components, below) and ``rng.*`` (see ``jtok_train.checkpoint.rng``).

Plugging in a component with its own state (e.g. a sharded token table's optimizer): give it::

    def sharded_state_dict(self, prefix: str) -> dict      # ShardedTensors with global shapes/offsets,
                                                            # keys starting with ``prefix``
    def load_state_dict(self, state: dict) -> None          # receives the loaded dict (same structure)

and list it in ``Trainer.checkpoint_components()`` under a stable name. A module inside the model is
covered by the model's own ``sharded_state_dict`` (Megatron calls a child's ``sharded_state_dict(prefix,
sharded_offsets, metadata)`` when it has one).
"""

from __future__ import annotations

from typing import Any

from jtok_train.compat import megatron as megatron_compat
from jtok_train.config import RunConfig
from jtok_train.errors import CheckpointError

__all__ = ["optimizer_layout", "model_sections", "components", "trainer_state"]


def components(trainer: Any) -> dict[str, Any]:
    """The trainer's pluggable checkpoint components (name -> object), if it has any."""
    fn = getattr(trainer, "checkpoint_components", None)
    return dict(fn()) if fn is not None else {}


def optimizer_layout(cfg: RunConfig) -> dict:
    """How Megatron's optimizer is checkpointed: plain (states per parameter) or the distributed optimizer
    with its ``distrib_optim_sharding_type`` (train.ckpt_optim_format). Stored in the checkpoint's meta; a
    load uses the checkpoint's layout, not the current config's."""
    p = cfg.parallel
    sizes = [int(p.tensor_model_parallel_size), int(p.pipeline_model_parallel_size), int(p.expert_model_parallel_size)]
    if (p.virtual_pipeline_model_parallel_size or 1) > 1:
        sizes.append(int(p.virtual_pipeline_model_parallel_size))
    if not p.use_distributed_optimizer:
        return {"distributed": False, "format": None, "model_parallel": sizes}
    return {"distributed": True, "format": str(cfg.train.ckpt_optim_format), "model_parallel": sizes}


def model_sections(trainer: Any) -> dict[str, Any]:
    """Every model chunk's sharded state dict: ``model`` (chunk 0, the only one without interleaved stages),
    ``model_vp{v}`` for chunk v > 0. The keys inside are global (layer numbers, table layer offsets)."""
    chunks = getattr(trainer, "chunks", None) or [trainer.model]
    return {"model" if v == 0 else f"model_vp{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}


def trainer_state(trainer: Any, is_loading: bool, rng: dict | None, layout: dict | None = None) -> dict:
    """The trainer's sharded state dict (to save, or as the target of a load with ``is_loading``);
    ``layout``: the optimizer layout (default: the current config's)."""
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
    for name, comp in components(trainer).items():
        if not hasattr(comp, "sharded_state_dict"):
            raise CheckpointError(f"component {name!r} ({type(comp).__name__}) has no sharded_state_dict(prefix): "
                                  "its state cannot be checkpointed (see jtok_train/checkpoint/state.py)")
        extra[name] = comp.sharded_state_dict(prefix=f"extra.{name}.")
    if extra:
        state["extra"] = extra
    if rng is not None:
        state["rng"] = rng
    return state
