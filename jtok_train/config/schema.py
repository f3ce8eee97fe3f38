"""Structured config schemas. Hydra composes YAML from ``jtok_train/configs/`` onto these dataclasses, so an
unknown key or a wrongly typed value fails at composition; ``validate`` then checks the values
against each other and names the offending key and the fix.

Field docstrings (the string after each field) are the documentation ``jtok-train --help`` shows.

Longer than 400 lines: the dataclasses are the reference of every key (one docstring per field, what
``--help`` and the README show) and ``validate`` checks their combinations next to them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from jtok_train.data.tokenizer import padded_vocab_size

__all__ = [
    "ModelConfig",
    "JTokConfig",
    "ParallelConfig",
    "DataConfig",
    "TrainConfig",
    "LoggingConfig",
    "EvalConfig",
    "RunConfig",
    "expert_tensor_parallel_size",
    "RETIRED_KEYS",
    "drop_retired_keys",
    "ConfigError",
    "validate",
]


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and how to fix it."""


@dataclass
class ModelConfig:
    name: str = MISSING
    "Config name (for logs and checkpoints)."
    num_layers: int = MISSING
    "Transformer layers (N_l)."
    hidden_size: int = MISSING
    "Model width d."
    num_attention_heads: int = MISSING
    "Attention heads."
    num_query_groups: Optional[int] = None
    "Key/value heads for grouped-query attention (None = multi-head)."
    ffn_hidden_size: int = MISSING
    "Dense MLP width (ignored by MoE layers, which use moe_ffn_hidden_size)."
    vocab_size: Optional[int] = MISSING
    ("Vocabulary size of the model and of the JTok tables (must cover the tokenizer's). null: the tokenizer's "
     "(data.tokenizer), padded to a multiple of 128 x TP like Megatron's make_vocab_size_divisible_by.")
    seq_length: int = 2048
    "Training sequence length."
    gated_linear_unit: bool = True
    "SwiGLU MLPs (Megatron-typical; the paper does not say)."
    normalization: str = "RMSNorm"
    "RMSNorm or LayerNorm."
    layernorm_epsilon: float = 1e-6
    "Epsilon of the backbone norms."
    position_embedding_type: str = "rope"
    "rope or learned_absolute."
    rotary_base: int = 10000
    "RoPE base."
    untie_embeddings_and_output_weights: bool = True
    "Separate output projection (True) or tied to the input embedding (False)."
    init_method_std: float = 0.02
    "Std of the backbone's weight init."
    num_experts: Optional[int] = None
    "Routed experts per layer; None = dense MLP backbone."
    moe_ffn_hidden_size: Optional[int] = None
    "Width of each routed expert."
    moe_router_topk: int = 2
    "Experts per token."
    moe_shared_expert_intermediate_size: Optional[int] = None
    "Total width of the shared expert(s) (None = no shared expert)."
    moe_aux_loss_coeff: float = 1e-2
    "Megatron MoE load-balancing loss coefficient."
    moe_token_dispatcher_type: str = "alltoall"
    "Megatron token dispatcher: alltoall or allgather."
    moe_router_score_function: str = "softmax"
    "MoE router score function (softmax or sigmoid)."
    transformer_impl: str = "local"
    "Layer implementation: local (Megatron's own modules, CPU and GPU) or transformer_engine (GPU only)."
    moe_router_load_balancing_type: str = "aux_loss"
    "Megatron MoE balancing loss: aux_loss (per micro-batch over its ranks), seq_aux_loss (per sequence) or none."
    recompute_granularity: Optional[str] = None
    "Activation recompute (Megatron's TransformerConfig.recompute_granularity): null (none), selective (the "
    "submodules of recompute_modules) or full (whole layers, replayed in the backward)."
    recompute_method: Optional[str] = None
    "full recompute: uniform (every chunk of recompute_num_layers layers) or block (the first recompute_num_layers "
    "layers of the stage)."
    recompute_num_layers: Optional[int] = None
    "full recompute: layers per chunk (uniform) or layers recomputed (block)."
    recompute_modules: Optional[list[str]] = None
    "selective recompute: any of core_attn, layernorm, mlp, moe, shared_experts (Megatron's names; null = "
    "[core_attn])."


@dataclass
class JTokConfig:
    variant: str = "none"
    "none (backbone alone), jtok (static gate on the FFN increment) or jtokm (routed mixture residual)."
    num_sets: int = 1
    "n_e: rows per token per layer (JTok: 1; JTok-M main runs: 5)."
    top_k: int = 1
    "K: rows blended per position (JTok-M main runs: 2, rho = K/n_e = 0.4)."
    eps: float = 1e-6
    "eps in normalize(u) = u / (||u||_2 + eps)."
    scale_init: float = 0.0
    "Initial value of the per-dimension scale s_l (0: the module starts as an identity)."
    table_init_std: float = 0.02
    ("Std of the N(0, std^2) table init. normalize() removes the scale from the forward, but not from training: "
     "AdamW moves an entry by about lr per step whatever its size, so rows drawn at std 1 turn ~50x slower than "
     "at 0.02 (benchmarks/quality/README.md: JTok-M +2.4% loss at std 1, -1.4% at 0.02, same budget).")
    router_init_std: float = 0.02
    "Std of JTok-M's router R_l init."
    router_norm_eps: float = 1e-6
    "Epsilon of JTok-M's router RMSNorm."
    aux_loss_coeff: float = 1e-4
    "lambda of JTok-M's load-balancing loss."
    aux_prob: str = "sigmoid"
    "P_i of the aux loss: sigmoid scores normalised over n_e (default) or softmax of the logits."
    depth_scaling: bool = True
    "JTok-M's 1/sqrt(2 N_l) factor (the paper: essential)."
    table_seed: int = 1234
    "Seed of the tables' init and row permutation (independent of the training seed and world size)."
    lr_mult: float = 1.0
    "Learning-rate multiplier of the token tables' parameter group."
    scale_lr_mult: float = 1.0
    ("Learning-rate multiplier of the per-dimension scales s_l (their own parameter group when != 1; no weight "
     "decay either way). benchmarks/quality/README.md, pilot of static JTok's init: see the jtok/*.yaml files.")
    weight_decay: float = 0.1
    "Weight decay of the token tables' parameter group."
    table_optimizer: str = "adamw"
    "sharded tables: adamw (dense over the shard, exact) or sparse_adamw (touched rows only, lazy moments)."


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    "Tensor parallel size."
    pipeline_model_parallel_size: int = 1
    "Pipeline parallel size (Megatron's 1F1B schedule); must divide model.num_layers. Each stage holds its layers' JTok tables."
    virtual_pipeline_model_parallel_size: Optional[int] = None
    "Interleaved pipeline: model chunks per rank (Megatron's interleaved 1F1B); PP x this must divide model.num_layers."
    expert_model_parallel_size: int = 1
    "Expert parallel size (MoE)."
    expert_tensor_parallel_size: Optional[int] = None
    "Tensor parallel size inside experts (None: 1 when expert parallel > 1, else the TP size)."
    sequence_parallel: bool = False
    "Megatron sequence parallelism (needs tensor parallel > 1)."
    use_distributed_optimizer: bool = False
    "Shard optimizer states over data-parallel ranks (Megatron DistributedOptimizer)."
    embedding: str = "replicated"
    "Token table storage: replicated (every rank holds the whole table) or sharded (rows split over ranks, exchanged by all-to-all)."
    overlap: bool = True
    "sharded: start each micro-batch's row exchange while the previous one computes."
    dedup: bool = True
    "sharded: exchange each distinct token id of a micro-batch once."
    hot_rows: int = 0
    "sharded: replicate the rows of the H most frequent token ids on every rank and exchange only the others (0: none). The ids come from the data's token counts (written by jtok-data build / stats) or from parallel.hot_rows_file."
    hot_rows_file: Optional[str] = None
    "sharded, hot_rows > 0: a file of token ids, most frequent first (.npy, or text with one id per line); its first hot_rows ids are the hot ones."
    backend: Optional[str] = None
    "torch.distributed backend; None picks nccl on GPU, gloo on CPU."


# Keys earlier versions had and this one dropped: a saved config that holds them still loads. data.num_workers did
# nothing; train.peak_flops (FLOP/s, 0: a guess) became train.peak_tflops, which a saved config's run never needs.
RETIRED_KEYS = ("data.num_workers", "train.peak_flops")


def drop_retired_keys(config: Any) -> Any:
    """A saved config (a dict or DictConfig, or YAML text) without the keys of ``RETIRED_KEYS``."""
    cfg = OmegaConf.create(config) if not isinstance(config, DictConfig) else config.copy()
    for key in RETIRED_KEYS:
        section, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, section) if section else cfg
        if isinstance(node, DictConfig) and name in node:
            node.pop(name)
    return cfg


def expert_tensor_parallel_size(parallel: Any = None, *, tp: int = 1, ep: int = 1, etp: int | None = None) -> int:
    """Tensor-parallel size inside the experts (the one rule, for the builder, the planner and the process
    groups): parallel.expert_tensor_parallel_size, else 1 with expert parallelism (TP 2 with EP 2 on 2 ranks
    only fits with 1, and experts rarely want TP) and the TP size without. ``parallel``: a ParallelConfig (or
    its DictConfig); or the sizes as keywords."""
    if parallel is not None:
        tp, ep, etp = (parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size,
                       parallel.expert_tensor_parallel_size)
    if etp is not None:
        return int(etp)
    return 1 if ep > 1 else int(tp)


@dataclass
class DataConfig:
    prefixes: list[str] = field(default_factory=list)
    "Megatron indexed dataset prefixes (path without .bin/.idx)."
    weights: Optional[list[float]] = None
    "Blend weights, one per prefix (None: one dataset, or equal weights)."
    tokenizer: str = MISSING
    "Path of the tokenizer.json the data was built with."
    split: str = "98,2,0"
    "Train/valid/test split of each dataset, in parts."
    cache_dir: Optional[str] = None
    "Where Megatron caches sample indices (default: next to the data)."
    loader: str = "megatron"
    "megatron (default: Megatron's GPTDataset, read on the host) or dali (NVIDIA DALI pipeline, GPU, same "
    "batches in the same order; needs nvidia-dali: pip install 'jtok-train[gpu]')."


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    "Sequences per micro-batch per data-parallel rank."
    global_batch_size: int = 8
    "Sequences per optimizer step over all ranks (= micro * accumulation * data-parallel size)."
    train_iters: int = 100
    "Optimizer steps."
    lr: float = 3e-4
    "Peak learning rate."
    min_lr: float = 3e-5
    "Final learning rate of the decay."
    lr_schedule: str = "cosine"
    "cosine or wsd (warmup-stable-decay)."
    warmup_fraction: float = 0.05
    "Share of train_iters spent in linear warmup."
    wsd_decay_fraction: float = 0.2
    "wsd: share of train_iters spent in the final decay."
    wsd_decay_style: str = "linear"
    "wsd: shape of the final decay (linear, cosine, exponential, minus_sqrt)."
    weight_decay: float = 0.1
    "AdamW weight decay of the backbone."
    adam_beta1: float = 0.9
    "AdamW beta1."
    adam_beta2: float = 0.95
    "AdamW beta2."
    adam_eps: float = 1e-8
    "AdamW epsilon."
    clip_grad: float = 1.0
    "Gradient clipping by global norm."
    precision: str = "fp32"
    "fp32 or bf16 (bf16 params with fp32 main weights in the optimizer)."
    seed: int = 1234
    "Training seed (data order, dropout)."
    eval_interval: int = 0
    "Validate every N steps (0: only at the end)."
    eval_samples: int = 64
    "Validation sequences per evaluation, over all ranks (the same sequences at any world size)."
    log_interval: int = 1
    "Log metrics every N steps."
    run_dir: str = "runs/default"
    "Run directory (checkpoints, resolved config, metrics)."
    save: bool = True
    "Save a checkpoint at the end."
    save_interval: int = 0
    "Save every N steps (0: only at the end)."
    keep_last: int = 3
    "Keep the newest K complete checkpoints of the run directory (0: keep all)."
    resume_from: Optional[str] = None
    "Resume from this checkpoint directory (or run directory: its latest); overrides auto_resume."
    auto_resume: bool = True
    "Resume from <run_dir>/checkpoints/latest when it exists."
    ckpt_optim_format: str = "dp_reshardable"
    "Distributed optimizer's checkpoint layout (Megatron's distrib_optim_sharding_type): dp_reshardable (each rank "
    "writes its own shard, no gather; reshards over the data-parallel size only, Megatron-LM's default) or "
    "fully_reshardable (states gathered into model-parameter shapes on save: reshards TP/PP/EP too, loads into "
    "the plain optimizer, costs a gather of the whole optimizer state per data-parallel group)."
    verify_checksums: bool = True
    "Check every checkpoint file's sha256 before loading (work spread over ranks)."
    ignore_data_change: bool = False
    "Resume even when the data fingerprint (datasets, blend, split, seq_length, seed, tokenizer) changed."
    nan_policy: str = "stop"
    "NaN/Inf loss: stop (save the last good step, then fail) or skip (drop the update, count it)."
    threads: int = 0
    "torch intra-op threads per rank (0: cores / local ranks)."
    progress: bool = True
    "Console progress bar."
    peak_tflops: Optional[float] = None
    ("Peak TFLOP/s of one device, the MFU's denominator (e.g. 989 for an H100 in bf16); null: a known GPU's "
     "datasheet bf16 peak (H100, H200, A100, B200), and no MFU on CPU or on another GPU.")
    callbacks: list[str] = field(default_factory=list)
    ("Callbacks of your own, after the built-in ones (metrics, validation, downstream evaluation, checkpoints, "
     "preemption, the non-finite policy: each on by its own settings): 'package.module:name', called with the run "
     "config and returning a jtok_train.training.callbacks.Callback (a Callback subclass taking cfg works).")


@dataclass
class LoggingConfig:
    wandb: bool = True
    "Log to Weights & Biases (run files in <run_dir>/wandb; false: metrics.jsonl and the console only)."
    wandb_mode: str = "offline"
    "offline (default: nothing leaves the machine; upload later with `wandb sync <run_dir>/wandb/offline-run-*`) "
    "or online (needs `wandb login` or WANDB_API_KEY)."
    wandb_project: str = "jtok-train"
    "W&B project."
    wandb_entity: Optional[str] = None
    "W&B entity (team or user; None: the account's default)."
    wandb_name: Optional[str] = None
    "W&B run name (None: the run directory's name)."
    metrics_file: bool = True
    "Write metrics.jsonl in the run directory."


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)
    ("lm-eval tasks evaluated during training (downstream accuracy, logged as eval/<task>/<metric> next to "
     "valid_loss), e.g. [demo_cloze]; empty: none. Log-likelihood tasks only (multiple choice, perplexity).")
    interval: int = 0
    "Steps between downstream evaluations (0: only after the last step); each run also follows the last step."
    limit: Optional[float] = None
    "Documents per task (an integer, or a fraction < 1 of each task); null: all."
    num_fewshot: Optional[int] = None
    "Few-shot examples per prompt (null: each task's own default)."
    batch_size: int = 8
    "Sequences per forward on each data-parallel rank."
    include_path: Optional[str] = None
    "A directory of more lm-eval task YAML files (jtok-train's own, with demo_cloze, is always included)."
    seed: int = 1234
    "Seed of lm-eval's few-shot sampling."


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    jtok: JTokConfig = field(default_factory=JTokConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _need(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {expected}")


def _section_schema(name: str) -> Any:
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    if name not in sections:
        raise ConfigError(f"unknown config section {name!r}: expected one of {sorted(sections)}")
    return globals()[sections[name]] if isinstance(sections[name], str) else sections[name]


def _check_key(name: str, key: str) -> None:
    known = {f.name for f in dataclasses.fields(_section_schema(name))}
    if key not in known:
        hint = difflib.get_close_matches(key, known, n=1)
        extra = f" (did you mean {name}.{hint[0]}?)" if hint else ""
        raise ConfigError(f"unknown config key {name}.{key}{extra}")


def _check_known_keys(cfg: RunConfig) -> None:
    """Hydra lets ``+section.key=...`` add keys even to a structured node; reject them here."""
    for name, node in cfg.items() if hasattr(cfg, "items") else []:
        if name == "hydra":
            continue
        _section_schema(name)
        for key in node.keys():
            _check_key(name, key)


def check_override_keys(overrides: Any) -> None:
    """Command-line overrides (``section.key=value``, ``+``/``++``/``~`` prefixed or not) name known keys, or a
    :class:`ConfigError` names the key and the closest known one, before Hydra composes (whose own message for
    an unknown key suggests appending it with ``+``, which the schema would refuse next)."""
    for o in overrides:
        key = str(o).split("=", 1)[0].lstrip("+~")
        parts = key.split(".")
        if ("=" not in str(o) or str(o).startswith("-") or len(parts) < 2 or parts[0] == "hydra" or "@" in key
                or "/" in key):
            continue      # a flag, a group choice (model=tiny), Hydra's own keys, a package or path override
        _check_key(parts[0], parts[1])


# Megatron's selective-recompute modules that run with this project's layers (local spec, per-expert MLPs):
# moe_act needs grouped GEMM and mla_up_proj multi-latent attention, neither of which is built here.
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "shared_experts")


def _validate_recompute(m: Any) -> None:
    g = m.recompute_granularity
    _need(g in (None, "selective", "full"), "model.recompute_granularity", g, "null, selective or full")
    if g == "full":
        _need(m.recompute_method in ("uniform", "block"), "model.recompute_method", m.recompute_method,
              "full recompute needs uniform or block")
        _need(m.recompute_num_layers is not None and 1 <= m.recompute_num_layers <= m.num_layers,
              "model.recompute_num_layers", m.recompute_num_layers,
              f"full recompute needs a layer count in [1, model.num_layers={m.num_layers}]")
    else:
        _need(m.recompute_method is None, "model.recompute_method", m.recompute_method,
              "is for model.recompute_granularity=full; set it to null")
        _need(m.recompute_num_layers is None, "model.recompute_num_layers", m.recompute_num_layers,
              "is for model.recompute_granularity=full; set it to null")
    if m.recompute_modules is not None:
        _need(g == "selective", "model.recompute_modules", list(m.recompute_modules),
              "is for model.recompute_granularity=selective")
        mods = list(m.recompute_modules)
        bad = [x for x in mods if x not in RECOMPUTE_MODULES]
        _need(not bad and mods, "model.recompute_modules", mods,
              f"must be a non-empty list of {', '.join(RECOMPUTE_MODULES)}")
        moe = m.num_experts is not None
        for name, ok, why in (("mlp", not moe, "a dense backbone (use moe for an MoE one)"),
                              ("moe", moe, "an MoE backbone (use mlp for a dense one)"),
                              ("shared_experts", moe and m.moe_shared_expert_intermediate_size,
                               "an MoE backbone with a shared expert")):
            _need(name not in mods or ok, "model.recompute_modules", mods, f"{name} needs {why}")


def validate(cfg: RunConfig, world_size: Optional[int] = None, tokenizer_vocab: Optional[int] = None) -> None:
    """Check keys, values and their relations; raise ConfigError naming the key. ``cfg`` is a RunConfig
    (dataclass or OmegaConf node). With ``world_size``: the parallel layout and batch sizes against it; with
    ``tokenizer_vocab``: the model's vocabulary against the tokenizer's."""
    _check_known_keys(cfg)
    _validate_model(cfg.model)
    _validate_recompute(cfg.model)
    _validate_jtok(cfg.jtok)
    _validate_parallel(cfg)
    _validate_train(cfg)
    if getattr(cfg, "eval", None) is not None:
        _validate_eval(cfg.eval, cfg.parallel)
    if world_size is not None:
        _validate_world(cfg, world_size)
    if tokenizer_vocab is not None:
        _validate_tokenizer_vocab(cfg, tokenizer_vocab)


def _validate_model(m: Any) -> None:
    if m.vocab_size is None:
        raise ConfigError("model.vocab_size=null has not been resolved from data.tokenizer: compose the config with "
                          "jtok_train.config.compose (or call jtok_train.config.resolve_vocab_size) before validating")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "seq_length"):
        _need(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be a positive integer")
    _need(m.hidden_size % m.num_attention_heads == 0, "model.num_attention_heads", m.num_attention_heads,
          f"must divide model.hidden_size={m.hidden_size}")
    if m.num_query_groups is not None:
        _need(m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups == 0,
              "model.num_query_groups", m.num_query_groups, f"must divide num_attention_heads={m.num_attention_heads}")
    _need(m.normalization in ("RMSNorm", "LayerNorm"), "model.normalization", m.normalization, "RMSNorm or LayerNorm")
    _need(m.transformer_impl in ("local", "transformer_engine"), "model.transformer_impl", m.transformer_impl,
          "local or transformer_engine")
    if m.transformer_impl == "transformer_engine":
        _need(importlib.util.find_spec("transformer_engine") is not None, "model.transformer_impl",
              m.transformer_impl, "transformer-engine is not installed (GPU only: pip install 'jtok-train[gpu]', "
              "or use the docker image); use model.transformer_impl=local")
    _need(m.position_embedding_type in ("rope", "learned_absolute"), "model.position_embedding_type",
          m.position_embedding_type, "rope or learned_absolute")
    if m.num_experts is not None:
        _need(m.num_experts > 0, "model.num_experts", m.num_experts, "must be positive (or null for a dense MLP)")
        _need(m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size > 0, "model.moe_ffn_hidden_size",
              m.moe_ffn_hidden_size, "must be a positive integer for an MoE backbone")
        _need(1 <= m.moe_router_topk <= m.num_experts, "model.moe_router_topk", m.moe_router_topk,
              f"must be in [1, num_experts={m.num_experts}]")
        _need(m.moe_router_load_balancing_type in ("aux_loss", "seq_aux_loss", "none"),
              "model.moe_router_load_balancing_type", m.moe_router_load_balancing_type, "aux_loss, seq_aux_loss or none")
        _need(m.moe_token_dispatcher_type in ("alltoall", "allgather"), "model.moe_token_dispatcher_type",
              m.moe_token_dispatcher_type, "alltoall or allgather")



def _validate_jtok(j: Any) -> None:
    _need(j.variant in ("none", "jtok", "jtokm"), "jtok.variant", j.variant, "none, jtok or jtokm")
    if j.variant != "none":
        _need(j.num_sets >= 1, "jtok.num_sets", j.num_sets, "must be >= 1")
        _need(1 <= j.top_k <= j.num_sets, "jtok.top_k", j.top_k, f"K must be in [1, jtok.num_sets={j.num_sets}]")
        if j.variant == "jtok":
            _need(j.num_sets == 1 and j.top_k == 1, "jtok.num_sets", j.num_sets,
                  "static JTok has one row per token per layer (num_sets=1, top_k=1); use jtok=jtokm for a mixture")
        _need(j.eps > 0, "jtok.eps", j.eps, "must be > 0")
        _need(j.table_init_std > 0, "jtok.table_init_std", j.table_init_std, "must be > 0")
        _need(j.aux_loss_coeff >= 0, "jtok.aux_loss_coeff", j.aux_loss_coeff, "must be >= 0")
        _need(j.aux_prob in ("sigmoid", "softmax"), "jtok.aux_prob", j.aux_prob, "sigmoid or softmax")
        _need(j.lr_mult > 0, "jtok.lr_mult", j.lr_mult, "must be > 0")
        _need(j.scale_lr_mult > 0, "jtok.scale_lr_mult", j.scale_lr_mult, "must be > 0")


def _validate_parallel(cfg: RunConfig) -> None:
    m, j, p = cfg.model, cfg.jtok, cfg.parallel
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        _need(getattr(p, key) >= 1, f"parallel.{key}", getattr(p, key), "must be >= 1")
    _need(p.embedding in ("replicated", "sharded"), "parallel.embedding", p.embedding, "replicated or sharded")
    _need(j.table_optimizer in ("adamw", "sparse_adamw"), "jtok.table_optimizer", j.table_optimizer,
          "adamw or sparse_adamw")
    if p.embedding == "sharded" and p.tensor_model_parallel_size > 1:
        _need(p.sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
              "sharded tables with tensor parallelism need sequence parallelism (each TP rank serves its own "
              "sequence shard): set parallel.sequence_parallel=true")
    _need(p.hot_rows >= 0, "parallel.hot_rows", p.hot_rows, "must be >= 0")
    if p.hot_rows:
        _need(p.embedding == "sharded" and j.variant != "none", "parallel.hot_rows", p.hot_rows,
              "hot rows are replicas of sharded JTok table rows: set parallel.embedding=sharded (and a jtok "
              "variant) or parallel.hot_rows=0")
        _need(p.hot_rows <= m.vocab_size, "parallel.hot_rows", p.hot_rows,
              f"must be at most model.vocab_size={m.vocab_size}")
    if p.embedding == "replicated":
        _need(j.table_optimizer == "adamw", "jtok.table_optimizer", j.table_optimizer,
              "sparse_adamw needs parallel.embedding=sharded (replicated tables use Megatron's optimizer)")
    if p.sequence_parallel:
        _need(p.tensor_model_parallel_size > 1, "parallel.sequence_parallel", True,
              "needs parallel.tensor_model_parallel_size > 1")
    if p.expert_model_parallel_size > 1:
        _need(m.num_experts is not None and m.num_experts % p.expert_model_parallel_size == 0,
              "parallel.expert_model_parallel_size", p.expert_model_parallel_size,
              f"needs an MoE model whose num_experts ({m.num_experts}) it divides")
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None:
        _need(vpp >= 1, "parallel.virtual_pipeline_model_parallel_size", vpp, "must be a positive integer or null")
        _need(vpp == 1 or p.pipeline_model_parallel_size > 1, "parallel.virtual_pipeline_model_parallel_size", vpp,
              "interleaved stages need parallel.pipeline_model_parallel_size > 1")
    if p.pipeline_model_parallel_size > 1:
        pp = p.pipeline_model_parallel_size
        _need(m.num_layers % pp == 0, "parallel.pipeline_model_parallel_size", pp,
              f"must divide model.num_layers={m.num_layers} (every stage holds the same number of layers)")
        if vpp is not None and vpp > 1:
            _need(m.num_layers % (pp * vpp) == 0, "parallel.virtual_pipeline_model_parallel_size", vpp,
                  f"pipeline stages x virtual stages = {pp} x {vpp} must divide model.num_layers={m.num_layers} "
                  "(every model chunk holds the same number of layers)")
    if p.tensor_model_parallel_size > 1:
        _need(m.num_attention_heads % p.tensor_model_parallel_size == 0, "parallel.tensor_model_parallel_size",
              p.tensor_model_parallel_size, f"must divide model.num_attention_heads={m.num_attention_heads}")


def _validate_train(cfg: RunConfig) -> None:
    t = cfg.train
    for key in ("micro_batch_size", "global_batch_size", "train_iters", "eval_samples"):
        _need(getattr(t, key) > 0, f"train.{key}", getattr(t, key), "must be a positive integer")
    _need(t.lr > 0 and 0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"must be in [0, train.lr={t.lr}]")
    _need(t.lr_schedule in ("cosine", "wsd", "constant"), "train.lr_schedule", t.lr_schedule, "cosine, wsd or constant")
    _need(0 <= t.warmup_fraction < 1, "train.warmup_fraction", t.warmup_fraction, "must be in [0, 1)")
    _need(0 < t.wsd_decay_fraction <= 1, "train.wsd_decay_fraction", t.wsd_decay_fraction, "must be in (0, 1]")
    _need(t.precision in ("fp32", "bf16"), "train.precision", t.precision, "fp32 or bf16")
    _need(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", t.peak_tflops,
          "must be > 0: one device's peak in TFLOP/s (e.g. train.peak_tflops=989 for an H100 in bf16), or null")
    d = getattr(cfg, "data", None)
    if d is not None and getattr(d, "loader", "megatron") != "megatron":
        _need(d.loader == "dali", "data.loader", d.loader, "megatron or dali")
        # lazy: cost (torch and Megatron's datasets, seconds: only with data.loader=dali)
        from jtok_train.data.dali import dali_missing_reason

        reason = dali_missing_reason()
        _need(reason is None, "data.loader", d.loader, f"{reason}; use data.loader=megatron")
    lg = getattr(cfg, "logging", None)
    if lg is not None:
        _need(lg.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode", lg.wandb_mode,
              "offline, online or disabled")
    _need(t.clip_grad >= 0, "train.clip_grad", t.clip_grad, "must be >= 0")
    _need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _need(t.nan_policy in ("stop", "skip"), "train.nan_policy", t.nan_policy, "stop or skip")
    _need(t.ckpt_optim_format in ("dp_reshardable", "fully_reshardable"), "train.ckpt_optim_format",
          t.ckpt_optim_format, "dp_reshardable or fully_reshardable")
    _need(t.keep_last >= 0, "train.keep_last", t.keep_last, "must be >= 0 (0 keeps all)")
    _need(t.save_interval >= 0, "train.save_interval", t.save_interval, "must be >= 0 (0: only at the end)")
    for c in t.callbacks:
        _need(isinstance(c, str) and c.count(":") == 1 and all(c.split(":")), "train.callbacks", list(t.callbacks),
              f"{c!r} is not 'package.module:name' (a callable taking the run config, returning a Callback)")


def _validate_eval(ev: Any, p: Any) -> None:
    _need(ev.interval >= 0, "eval.interval", ev.interval, "must be >= 0 (0: only after the last step)")
    _need(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, "must be a positive integer")
    _need(ev.limit is None or ev.limit > 0, "eval.limit", ev.limit, "must be a positive count or fraction, or null")
    _need(ev.num_fewshot is None or ev.num_fewshot >= 0, "eval.num_fewshot", ev.num_fewshot, "must be >= 0 or null")
    if list(ev.tasks):
        _need(p.pipeline_model_parallel_size == 1, "eval.tasks", list(ev.tasks),
              "in-loop evaluation needs parallel.pipeline_model_parallel_size=1; evaluate the checkpoints "
              "with jtok-eval instead")


def _validate_world(cfg: RunConfig, world_size: int) -> None:
    p, t = cfg.parallel, cfg.train
    vpp = p.virtual_pipeline_model_parallel_size
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    _need(world_size % mp == 0, "parallel.tensor_model_parallel_size", p.tensor_model_parallel_size,
          f"TP x PP = {mp} must divide the world size {world_size}")
    dp = world_size // mp
    _need(dp % p.expert_model_parallel_size == 0 or p.expert_model_parallel_size % dp == 0,
          "parallel.expert_model_parallel_size", p.expert_model_parallel_size,
          f"incompatible with data-parallel size {dp} (world {world_size})")
    per_step = t.micro_batch_size * dp
    _need(t.global_batch_size % per_step == 0, "train.global_batch_size", t.global_batch_size,
          f"must be a multiple of micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
    _need(t.eval_samples % per_step == 0, "train.eval_samples", t.eval_samples,
          f"must be a multiple of micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
    if vpp is not None and vpp > 1:
        # Megatron's interleaved schedule runs micro-batches in groups of PP per model chunk: a last group of
        # fewer than PP is refused by the schedule (a dependency bubble), so every count must be a multiple
        pp = p.pipeline_model_parallel_size
        for key, n in (("train.global_batch_size", t.global_batch_size), ("train.eval_samples", t.eval_samples)):
            _need((n // per_step) % pp == 0, key, n,
                  f"gives {n // per_step} micro-batches per step; the interleaved pipeline needs a multiple of "
                  f"parallel.pipeline_model_parallel_size={pp}: make it a multiple of "
                  f"{per_step * pp} (micro_batch_size x data-parallel size x PP)")


def _validate_tokenizer_vocab(cfg: RunConfig, tokenizer_vocab: int) -> None:
    m, p, d = cfg.model, cfg.parallel, getattr(cfg, "data", None)

    tok = getattr(d, "tokenizer", None) if d is not None else None
    _need(m.vocab_size >= tokenizer_vocab, "model.vocab_size", m.vocab_size,
          f"smaller than the tokenizer's vocabulary ({tokenizer_vocab}){f' of data.tokenizer={tok}' if tok else ''}; set "
          f"model.vocab_size={padded_vocab_size(tokenizer_vocab, 128, p.tensor_model_parallel_size)} (the "
          "tokenizer's, padded to a multiple of 128 x TP like Megatron's make_vocab_size_divisible_by) or more")


