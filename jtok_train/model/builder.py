"""Build the GPT model: Megatron-Core's GPTModel, plus JTok / JTok-M when the config asks for it.

With ``jtok.variant=none`` the result *is* Megatron's GPTModel built from Megatron's own spec, so the
backbone alone is exactly what Megatron trains. Otherwise ``JTokGPTModel`` (a GPTModel subclass)
owns a token-row provider and looks up the micro-batch's rows before running the layers.

The model built here is plain: its JTok tables are replicated (a model parameter). Embedding parallelism is
applied after the build (``jtok_train.parallel.parallelize``, torchtitan's model / parallelize split), which
swaps in the row-sharded provider; this module imports nothing of parallel/, data/, training/ or compat/.

Megatron's parallel state must be initialised before building (``jtok_train.compat.init_model_parallel``).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from jtok_train.config import RunConfig
from jtok_train.config.schema import expert_tensor_parallel_size
from jtok_train.model.layer import jtok_module_spec, with_jtok
from jtok_train.tables.replicated import ReplicatedTokenTable
from jtok_train.tables.rows import (
    LayerSlice,
    ReplayGradSink,
    RowGradJoin,
    TokenRowProvider,
    TokenRowsContext,
    check_provider,
)

__all__ = ["JTokGPTModel", "build_transformer_config", "build_layer_spec", "build_model", "build_model_chunks",
           "build_token_table", "pipeline_stage_layers", "virtual_stages", "token_table_of"]


class JTokGPTModel(GPTModel):
    """GPTModel whose layers add JTok / JTok-M; ``token_table`` provides the rows per micro-batch (any
    ``TokenRowProvider``: checked here, a provider missing a member fails in one line)."""

    def __init__(self, *args: Any, token_table: TokenRowProvider, token_context: TokenRowsContext, **kwargs: Any):
        check_provider(token_table)
        super().__init__(*args, **kwargs)
        self.token_table = token_table
        self.token_context = token_context
        # A layer's rows are its position among this stage's layers (Megatron numbers layers globally).
        layers = list(self.decoder.layers)
        if len(layers) != token_table.num_layers:
            raise ValueError(f"this stage builds {len(layers)} layers but its token table holds {token_table.num_layers}")
        for i, layer in enumerate(layers):
            layer.table_index = i

    def forward(self, input_ids, position_ids, attention_mask, *args: Any, **kwargs: Any):
        rows = self.token_table.lookup(input_ids)
        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            # Layers replayed by full recompute send their row gradients through a join at the input of this
            # stage's layers (token_table.py), whose backward runs after every layer's: the embedding output on
            # the first stage, the activations received from the previous stage on the others.
            sink = ReplayGradSink()
            if self.pre_process and not args and kwargs.get("decoder_input") is None:
                decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
                kwargs["decoder_input"], unique_rows = RowGradJoin.apply(decoder_input, rows.unique_rows, sink)
                rows = replace(rows, unique_rows=unique_rows, replay_sink=sink)
            elif not self.pre_process and getattr(self.decoder, "input_tensor", None) is not None:
                # Megatron's pipeline schedule hands a later stage its input through set_input_tensor
                self.decoder.input_tensor, unique_rows = RowGradJoin.apply(self.decoder.input_tensor,
                                                                           rows.unique_rows, sink)
                rows = replace(rows, unique_rows=unique_rows, replay_sink=sink)
        self.token_context.current = rows
        try:
            out = super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self.token_context.current = None
        self.token_table.advance()   # this forward is enqueued: move the next micro-batch's exchange on
        return out


def token_table_of(model: Any) -> Optional[TokenRowProvider]:
    """The token-row provider of a model built here (None for a backbone-alone GPTModel)."""
    return model.token_table if isinstance(model, JTokGPTModel) else None


def build_transformer_config(cfg: RunConfig, **overrides: Any) -> TransformerConfig:
    """Megatron TransformerConfig from a RunConfig (model + parallel + train.precision)."""
    m, p = cfg.model, cfg.parallel
    bf16 = cfg.train.precision == "bf16"
    moe = m.num_experts is not None
    etp = expert_tensor_parallel_size(p)
    kw: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization=m.normalization,
        layernorm_epsilon=m.layernorm_epsilon,
        gated_linear_unit=m.gated_linear_unit,
        activation_func=torch.nn.functional.silu if m.gated_linear_unit else torch.nn.functional.gelu,
        add_bias_linear=False,           # per-expert MLPs fail with bias (DESIGN.md); modern LLMs drop it
        init_method_std=m.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_stages(cfg) if virtual_stages(cfg) > 1 else None,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=etp,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=True,
        recompute_granularity=getattr(m, "recompute_granularity"),
        recompute_method=getattr(m, "recompute_method"),
        recompute_num_layers=getattr(m, "recompute_num_layers"),
    )
    if virtual_stages(cfg) > 1 and p.pipeline_model_parallel_size > 1:
        # Megatron-LM's own setting for the interleaved schedule (its --overlap-p2p-communication default):
        # unbatched p2p, the two directions on two communicators when PP = 2. Batched, a rank's send to the next
        # stage and its send to the previous one go to the same peer when PP = 2, and the receiver matches them
        # by order, not by purpose: activations and gradients of the same shape would be swapped silently.
        kw.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if getattr(m, "recompute_modules") is not None:
        kw["recompute_modules"] = list(m.recompute_modules)
    if moe:
        kw.update(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_router_topk=m.moe_router_topk,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_router_score_function=m.moe_router_score_function,
            moe_grouped_gemm=False,      # needs a CUDA-only package; per-expert MLPs everywhere for now
        )
    kw.update(overrides)
    return TransformerConfig(**kw)


def virtual_stages(cfg: RunConfig) -> int:
    """Model chunks per rank: parallel.virtual_pipeline_model_parallel_size, 1 when unset."""
    return int(getattr(cfg.parallel, "virtual_pipeline_model_parallel_size", None) or 1)


def pipeline_stage_layers(cfg: RunConfig, device: Any = None, vp_stage: Optional[int] = None) -> LayerSlice:
    """The layers of the whole model this rank's pipeline stage (model chunk ``vp_stage`` of it, with
    interleaved stages) builds: all of them without PP, or for an accounting build on the meta device. Chunks
    hold equal counts (the config refuses other splits), in Megatron's order: with P stages and V chunks per
    rank, chunk v of stage r holds layers [(v P + r) C, (v P + r + 1) C), C = L / (P V)."""
    L = cfg.model.num_layers
    pp = cfg.parallel.pipeline_model_parallel_size
    if pp == 1 or device == "meta":
        return LayerSlice(0, L, L)

    vpp = virtual_stages(cfg)
    count = L // (pp * vpp)
    return LayerSlice(((vp_stage or 0) * pp + ps.get_pipeline_model_parallel_rank()) * count, count, L)


def build_token_table(cfg: RunConfig, dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None,
                      vp_stage: Optional[int] = None, layers: Optional[LayerSlice] = None) -> ReplicatedTokenTable:
    """The replicated table of this pipeline stage's layers (of its model chunk ``vp_stage``): a model
    parameter. ``device='meta'`` allocates nothing (accounting, or a table that parallelize replaces);
    ``layers``: the stage's layers (default: this rank's stage, or the whole model for a meta build)."""
    j, m = cfg.jtok, cfg.model
    if layers is None:
        layers = pipeline_stage_layers(cfg, device, vp_stage)
    return ReplicatedTokenTable(
        vocab_size=m.vocab_size,
        num_layers=layers.count,
        layers=layers,
        num_sets=j.num_sets,
        hidden_size=m.hidden_size,
        seed=j.table_seed,
        init_std=j.table_init_std,
        dtype=dtype,
        device=device,
    )


def build_layer_spec(cfg: RunConfig, token_context: Optional[TokenRowsContext] = None, use_te: Optional[bool] = None) -> ModuleSpec:
    """Megatron's GPT layer spec (local, or Transformer Engine on GPU), with JTok when enabled."""
    m, j = cfg.model, cfg.jtok
    if use_te is None:
        use_te = getattr(m, "transformer_impl", "local") == "transformer_engine"
    if use_te:
        # lazy: optional (transformer_engine: Megatron's TE spec imports it)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=m.num_experts, moe_grouped_gemm=m.num_experts is not None)
    else:
        spec = get_gpt_layer_local_spec(num_experts=m.num_experts, moe_grouped_gemm=False, normalization=m.normalization)
    if j.variant == "none":
        return spec
    if token_context is None:
        raise ValueError("a JTok layer spec needs the TokenRowsContext shared with its model")
    if j.variant == "jtok":
        jspec = jtok_module_spec("jtok", hidden_size=m.hidden_size, eps=j.eps, scale_init=j.scale_init)
    else:
        jspec = jtok_module_spec(
            "jtokm",
            hidden_size=m.hidden_size,
            num_sets=j.num_sets,
            top_k=j.top_k,
            num_layers=m.num_layers,
            eps=j.eps,
            router_norm_eps=j.router_norm_eps,
            scale_init=j.scale_init,
            router_init_std=j.router_init_std,
            aux_loss_coeff=j.aux_loss_coeff,
            aux_prob=j.aux_prob,
            depth_scaling=j.depth_scaling,
        )
    return with_jtok(spec, jspec, token_context)


def build_model(cfg: RunConfig, config: Optional[TransformerConfig] = None, use_te: Optional[bool] = None, device: Any = None,
                vp_stage: Optional[int] = None, table_device: Any = None) -> GPTModel:
    """Build the (JTok)GPTModel for ``cfg``: this rank's pipeline stage, or its model chunk ``vp_stage`` with
    interleaved stages (``build_model_chunks`` builds them all), with replicated tables. ``device='meta'``
    builds without allocating (accounting); ``table_device``: where the table is allocated (default: with the
    rest of the model; 'meta' when parallelize replaces it)."""
    m = cfg.model
    if config is None:
        config = build_transformer_config(cfg)
    first = last = True
    if device != "meta" and cfg.parallel.pipeline_model_parallel_size > 1:
        interleaved = vp_stage is not None
        first = ps.is_pipeline_first_stage(ignore_virtual=not interleaved, vp_stage=vp_stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=not interleaved, vp_stage=vp_stage)
    common = dict(
        config=config,
        vocab_size=m.vocab_size,
        max_sequence_length=m.seq_length,
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_base=m.rotary_base,
        parallel_output=True,
    )
    if vp_stage is not None:
        common["vp_stage"] = vp_stage
    ctx = torch.device("meta") if device == "meta" else torch.device(device) if device is not None else None
    with ctx if ctx is not None else contextlib.nullcontext():
        if cfg.jtok.variant == "none":
            return GPTModel(transformer_layer_spec=build_layer_spec(cfg, use_te=use_te), **common)
        token_context = TokenRowsContext()
        spec = build_layer_spec(cfg, token_context, use_te=use_te)
        if device == "meta":
            table = build_token_table(cfg, device="meta")
        else:
            # this stage's layers even when the table is a meta placeholder (pipeline_stage_layers gives a meta
            # *model* build the whole model's)
            table = build_token_table(cfg, device=table_device, vp_stage=vp_stage,
                                      layers=pipeline_stage_layers(cfg, None, vp_stage))
        model = JTokGPTModel(transformer_layer_spec=spec, token_table=table, token_context=token_context, **common)
    for p in model.token_table.parameters():
        p.sequence_parallel = bool(config.sequence_parallel)
    return model


def build_model_chunks(cfg: RunConfig, config: Optional[TransformerConfig] = None, use_te: Optional[bool] = None,
                       table_device: Any = None) -> list[GPTModel]:
    """This rank's model chunks, in Megatron's order: one (its pipeline stage), or V with interleaved stages
    (parallel.virtual_pipeline_model_parallel_size), each holding its own layers and their JTok tables."""
    vpp = virtual_stages(cfg)
    if vpp == 1 or cfg.parallel.pipeline_model_parallel_size == 1:
        return [build_model(cfg, config, use_te, table_device=table_device)]
    return [build_model(cfg, config, use_te, vp_stage=v, table_device=table_device) for v in range(vpp)]
