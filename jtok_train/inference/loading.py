"""Load a training checkpoint for inference at world size 1.

The checkpoint is the one ``jtok_train.checkpoint`` writes (Megatron dist_checkpointing,
torch_dist format). Only its ``model`` section is read, with the same safety rules as a training resume:
checksums, the allow-list check of the ``.metadata`` pickle, ``weights_only`` for ``common.pt`` and for
any byte object. The model is rebuilt from the resolved config saved in the checkpoint, at one rank
(tensor/expert/pipeline parallel sizes 1): a checkpoint saved on W ranks loads because every tensor is a
ShardedTensor with global offsets, sharded tables included (they are stored as one global table in
permuted row order; a one-rank ``ShardedTokenTable`` owns all of it).

Then the JTok tables are handed to the provider inference wants:

* ``tables="host"``: ``HostTokenTable`` (the table in host memory, only the current tokens' rows go to
  the device per forward);
* ``tables="device"``: a ``ReplicatedTokenTable`` on the device (the training path's provider).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import Float16Module
from omegaconf import OmegaConf

from jtok_train.checkpoint import latest_checkpoint, load_sharded_state, read_dcp_metadata, read_meta, verify_checkpoint
from jtok_train.compat import device as compute_device
from jtok_train.compat import init_distributed, init_model_parallel
from jtok_train.config.schema import RunConfig, drop_retired_keys
from jtok_train.data.tokenizer import load_tokenizer
from jtok_train.errors import CheckpointError, UsageError
from jtok_train.model.builder import build_model, build_transformer_config, token_table_of
from jtok_train.tables.host import HostTokenTable
from jtok_train.tables.placement import RowPlacement
from jtok_train.tables.replicated import ReplicatedTokenTable
from jtok_train.tables.rows import check_provider

__all__ = ["LoadedModel", "resolve_checkpoint", "load_for_inference", "place_tables", "TABLE_PLACEMENTS"]

TABLE_PLACEMENTS = ("host", "device")


@dataclass
class LoadedModel:
    model: Any                 # what to call: the GPTModel (wrapped in Float16Module for bf16 checkpoints)
    unwrapped: Any             # the (JTok)GPTModel itself
    cfg: RunConfig                   # the checkpoint's resolved config (parallel sizes set to 1)
    meta: dict                 # the checkpoint's meta (step, world size, ...)
    path: Path                 # the checkpoint directory loaded
    device: torch.device
    tables: str                # host | device | none (a backbone-alone model)

    @property
    def provider(self) -> Any:
        """The model's token-row provider (``jtok_train.tables.rows.TokenRowProvider``; None without JTok)."""
        return token_table_of(self.unwrapped)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (its latest checkpoint) or ``<run>/checkpoints``."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint={path} does not exist: pass a run directory (train.run_dir of a run "
                              "saved with train.save=true) or one of its checkpoints/step_* directories")
    if p.is_dir() and (p / "common.pt").is_file():
        return p
    for run_dir in (p, p.parent if p.name == "checkpoints" else None):
        if run_dir is not None and (run_dir / "checkpoints").is_dir():
            found = latest_checkpoint(run_dir)
            if found is None:
                raise CheckpointError(f"checkpoint={path}: the run has no complete checkpoint (train with "
                                      "train.save=true or train.save_interval=N)")
            return found
    raise CheckpointError(f"checkpoint={path} is neither a checkpoint directory (with common.pt) nor a run "
                          "directory (with checkpoints/): pass train.run_dir of a saved run")


def _inference_config(meta: dict, path: Path) -> Any:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), drop_retired_keys(meta["config"]))
    except Exception as e:  # noqa: BLE001 - an unreadable or foreign config, in one line
        raise CheckpointError(f"checkpoint {path}: its saved config does not match this version of jtok-train "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    p = cfg.parallel
    # one rank: every expert and every table row is local; the table layout (replicated/sharded) is kept,
    # because it decides the checkpoint keys
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = p.expert_model_parallel_size = 1
    p.expert_tensor_parallel_size = None
    p.sequence_parallel = False
    p.use_distributed_optimizer = False
    p.overlap = False
    return cfg


def _table_in_token_order(table: Any) -> torch.Tensor:
    """The whole table [V, L, n_e, d] in token order (the model's replicated provider)."""
    return table.weight.detach()


def _read_sharded_table_as_replicated(state: dict, cfg: RunConfig, prefix: str) -> Any:
    """A checkpoint of sharded tables stores them as one global [V, L, n_e, d] tensor in permuted row order
    (key ``token_table.shard``, ``ShardedTokenTable.sharded_tensor``), while the plain model inference builds
    holds a replicated table in token order (``token_table.weight``). Ask for the stored tensor instead of the
    weight; the returned function puts a loaded state's rows back in token order under the weight's key."""
    wkey, skey = f"{prefix}token_table.weight", f"{prefix}token_table.shard"
    weight = state.pop(wkey).data
    state[skey] = ShardedTensor.from_rank_offsets(skey, torch.empty_like(weight))
    position_of = RowPlacement(cfg.model.vocab_size, 1, cfg.jtok.table_seed).position_of

    def to_token_order(loaded: dict) -> dict:
        permuted = loaded.pop(skey)
        loaded[wkey] = permuted[position_of]        # token t sits at permuted position position_of[t]
        return loaded

    return to_token_order


def _model_key_prefix(path: Path) -> str:
    """What the training wrappers put before the model's own keys ("module." for Megatron's DDP, once more
    for Float16Module): read from the checkpoint's tensor names (allow-list unpickler, no code runs)."""
    keys = read_dcp_metadata(path).state_dict_metadata.keys()
    anchor = "output_layer.weight"
    for alt in (anchor, "embedding.word_embeddings.weight"):
        for k in keys:
            if k.endswith(alt) and not k.startswith(("optimizer.", "rng.", "extra.")):
                return k[: -len(alt)]
    raise CheckpointError(f"checkpoint {path} holds no GPT model weights (no *{anchor}): not a jtok-train "
                          "training checkpoint")


def place_tables(model: Any, tables: str, device: torch.device | str, bf16: bool = False) -> str:
    """Replace a JTokGPTModel's table provider by the one inference uses (host: ``HostTokenTable`` on
    ``device``; device: a ``ReplicatedTokenTable`` the caller moves with the model). Returns the placement
    (``none`` for a backbone-alone model). bf16: the model runs in bf16 (Float16Module), the table too."""
    if tables not in TABLE_PLACEMENTS:
        raise ValueError(f"tables={tables!r} is invalid: use tables=host (rows copied per token) or tables=device")
    table = token_table_of(model)
    if table is None:
        return "none"
    full = _table_in_token_order(table).cpu()
    if bf16:
        full = full.to(torch.bfloat16)
    del model.token_table                       # an nn.Module child: replaced by a provider below
    if tables == "host":
        provider: Any = HostTokenTable(full, device)
    else:
        v, L, n_e, d = full.shape
        provider = ReplicatedTokenTable(v, L, n_e, d, dtype=full.dtype, device="meta")
        provider.weight = torch.nn.Parameter(full.clone(), requires_grad=False)
    check_provider(provider)
    model.token_table = provider
    return tables


def load_for_inference(
    checkpoint: str | Path,
    tables: str = "host",
    device: torch.device | str | None = None,
    verify_checksums: bool = True,
) -> LoadedModel:
    """Rebuild the checkpoint's model at world size 1, load its weights and place its JTok tables."""
    if tables not in TABLE_PLACEMENTS:
        raise ValueError(f"tables={tables!r} is invalid: use tables=host (rows copied per token) or tables=device")

    # before the heavy imports: a wrong or damaged checkpoint fails in a moment
    path = resolve_checkpoint(checkpoint)
    if verify_checksums:
        verify_checkpoint(path)
    read_dcp_metadata(path)
    meta = read_meta(path)

    init_distributed()
    if dist.get_world_size() != 1:
        raise RuntimeError(f"inference runs on one process (world size {dist.get_world_size()}): start it "
                           "without torchrun")
    cfg = _inference_config(meta, path)
    init_model_parallel(seed=cfg.train.seed)
    dev = torch.device(device) if device is not None else compute_device()

    tconfig = build_transformer_config(cfg)
    model = build_model(cfg, tconfig)
    model.eval()
    prefix = _model_key_prefix(path)
    state = {"model": model.sharded_state_dict(prefix=prefix)}
    sharded = cfg.jtok.variant != "none" and cfg.parallel.embedding == "sharded"
    from_sharded = _read_sharded_table_as_replicated(state["model"], cfg, prefix) if sharded else None
    loaded, missing, unexpected = load_sharded_state(state, path, "its own config's model")
    # unexpected: asked for by the model, absent from the checkpoint; missing: in the checkpoint, not asked for
    unexpected = sorted(unexpected)
    extra = sorted(k for k in missing if k.startswith(prefix) and not k.startswith(("optimizer.", "rng.", "extra.")))
    if unexpected or extra:
        what = (f"lacks {len(unexpected)} key(s) the model needs ({unexpected[0]}, ...)" if unexpected else
                f"holds {len(extra)} model key(s) its config does not build ({extra[0]}, ...)")
        raise CheckpointError(f"checkpoint {path} {what}: it is incomplete or from another version of jtok-train")
    if from_sharded is not None:
        loaded["model"] = from_sharded(loaded["model"])
    model.load_state_dict({k[len(prefix):]: v for k, v in loaded["model"].items()}, strict=True)

    placement = place_tables(model, tables, dev, bf16=cfg.train.precision == "bf16")
    model.to(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    runner: Any = model
    if cfg.train.precision == "bf16":
        runner = Float16Module(tconfig, model)
        runner.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=runner, unwrapped=model, cfg=cfg, meta=meta, path=path, device=dev, tables=placement)


def check_tokenizer(tokenizer: Any, cfg: RunConfig, given: bool) -> None:
    """A tokenizer that cannot be the model's: more ids than the model has, or (when one is passed) another file
    than the checkpoint's own data.tokenizer; a UsageError naming both (jtok-eval and jtok-export exit 2)."""
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UsageError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids, more than the model's "
                         f"model.vocab_size={cfg.model.vocab_size}: pass the tokenizer the model was trained with")
    own = str(cfg.data.tokenizer)
    if given and os.path.isfile(own):
        if load_tokenizer(own).sha256 != tokenizer.sha256:
            raise UsageError(f"tokenizer {tokenizer.path} differs from the checkpoint's own {own}: drop "
                             "tokenizer= to use the one the model was trained with")
