"""Parameter and FLOP accounting (N_c, N_n, eta, rho; PAPER.md "Parameter counting").

Two independent paths that tests hold together:
- ``count_model``: counts the instantiated model (built on the meta device, so 61B costs nothing);
- ``formula_params``: the closed-form count from the config, summed from ``param_roles`` (one layer's
  parameters by role), which the capacity planner (``planning.memory.params_per_rank``) splits over ranks.

Conventions (the paper does not define them precisely; ours, stated here and in the README):
- token-indexed N_n: the JTok tables, L * n_e * V * d.
- activated N_c: parameters that do compute for a token: the whole backbone minus the input embedding
  table (a lookup, like the JTok tables) minus the routed experts a token does not visit
  ((E - k)/E of them), plus the small dense JTok parameters (scales, routers).
- FLOPs per token (training, forward + backward): 6 N_c + 12 L s d (attention scores and values,
  no causal discount, as in PaLM's MFU) + 3x JTok's element-wise work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from jtok_train.config import RunConfig

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ParamCounts", "ParamRoles", "param_roles", "count_model", "formula_params", "flops_per_token", "plan"]


@dataclass
class ParamCounts:
    backbone_params: int          # the GPT backbone (embeddings, layers, output), all experts
    jtok_dense_params: int        # JTok scales, JTok-M routers and router norms
    token_params: int             # N_n: the token-indexed tables
    embedding_params: int         # input embedding table (part of the backbone)
    routed_expert_params: int     # all routed experts (part of the backbone)
    active_params: int = 0        # N_c
    total_params: int = 0

    def finish(self, num_experts: int | None, topk: int) -> "ParamCounts":
        inactive = 0
        if num_experts:
            inactive = self.routed_expert_params * (num_experts - topk) // num_experts
        self.active_params = self.backbone_params - self.embedding_params - inactive + self.jtok_dense_params
        self.total_params = self.backbone_params + self.jtok_dense_params + self.token_params
        return self


@dataclass(frozen=True)
class ParamRoles:
    """The closed-form parameter counts by role for the local layer spec (RMSNorm weights, no biases): per
    decoder layer, and the parts the model holds once."""
    # per decoder layer
    attention: int          # QKV and output projections
    norms: int              # the layer's two norms
    dense_mlp: int          # 0 with MoE
    moe_router: int         # 0 without MoE
    shared_expert: int      # 0 without a shared expert
    routed_experts: int     # all E routed experts of the layer
    jtok_dense: int         # JTok scales, JTok-M routers and router norms
    table_row: int          # one token's table row in one layer: n_e d (0 without JTok)
    # once
    embedding: int          # input embedding table, V d
    position: int           # learned absolute position embedding (0 with RoPE)
    output: int             # untied output layer, V d (0 when tied to the embedding)
    final_norm: int


def param_roles(cfg: RunConfig) -> ParamRoles:
    m, j = cfg.model, cfg.jtok
    d, V = m.hidden_size, m.vocab_size
    heads = m.num_attention_heads
    head_dim = d // heads
    groups = m.num_query_groups or heads
    norm = d if m.normalization == "RMSNorm" else 2 * d
    glu = 2 if m.gated_linear_unit else 1

    def mlp(width: int) -> int:
        return glu * d * width + width * d

    moe = bool(m.num_experts)
    return ParamRoles(
        attention=d * (heads + 2 * groups) * head_dim + heads * head_dim * d,
        norms=2 * norm,
        dense_mlp=0 if moe else mlp(m.ffn_hidden_size),
        moe_router=d * m.num_experts if moe else 0,
        shared_expert=mlp(m.moe_shared_expert_intermediate_size) if moe and m.moe_shared_expert_intermediate_size else 0,
        routed_experts=m.num_experts * mlp(m.moe_ffn_hidden_size) if moe else 0,
        jtok_dense={"none": 0, "jtok": d, "jtokm": d * j.num_sets + 2 * d}[j.variant],
        table_row=j.num_sets * d if j.variant != "none" else 0,
        embedding=V * d,
        position=m.seq_length * d if m.position_embedding_type == "learned_absolute" else 0,
        output=V * d if m.untie_embeddings_and_output_weights else 0,
        final_norm=norm,
    )


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def count_model(model: "nn.Module", cfg: RunConfig) -> ParamCounts:
    """Count an instantiated (meta or real, world size 1) model by parameter role."""
    table = _numel(model.token_table.parameters()) if hasattr(model, "token_table") else 0
    jtok_dense = sum(_numel(layer.jtok.parameters()) for layer in model.decoder.layers if hasattr(layer, "jtok"))
    embedding = _numel(model.embedding.word_embeddings.parameters())
    routed = sum(
        _numel(layer.mlp.experts.parameters())
        for layer in model.decoder.layers
        if hasattr(layer.mlp, "experts")
    )
    backbone = _numel(model.parameters()) - table - jtok_dense
    return ParamCounts(backbone, jtok_dense, table, embedding, routed).finish(cfg.model.num_experts, cfg.model.moe_router_topk)


def formula_params(cfg: RunConfig) -> ParamCounts:
    """Closed-form count for the local layer spec (RMSNorm weights, no biases): ``param_roles`` summed."""
    m, r = cfg.model, param_roles(cfg)
    L = m.num_layers
    routed = L * r.routed_experts
    per_layer = r.attention + r.norms + r.dense_mlp + r.moe_router + r.shared_expert
    backbone = r.embedding + r.position + r.output + L * per_layer + routed + r.final_norm
    jtok_dense, token = L * r.jtok_dense, L * m.vocab_size * r.table_row
    return ParamCounts(backbone, jtok_dense, token, r.embedding, routed).finish(m.num_experts, m.moe_router_topk)


def flops_per_token(cfg: RunConfig, counts: ParamCounts) -> float:
    m, j = cfg.model, cfg.jtok
    d, L, s = m.hidden_size, m.num_layers, m.seq_length
    elementwise = {"none": 0, "jtok": 4 * d, "jtokm": (2 * j.top_k + 5) * d}[j.variant]
    return 6.0 * counts.active_params + 12.0 * L * s * d + 3.0 * L * elementwise


def plan(cfg: RunConfig, model: "nn.Module | None" = None) -> dict[str, Any]:
    """The jtok-plan report. Counts ``model`` if given, else the closed form."""
    counts = count_model(model, cfg) if model is not None else formula_params(cfg)
    rho = (cfg.jtok.top_k / cfg.jtok.num_sets) if cfg.jtok.variant != "none" else 0.0
    out = asdict(counts)
    out.update(
        model=cfg.model.name,
        jtok=cfg.jtok.variant,
        eta=counts.token_params / counts.active_params,
        rho=rho,
        flops_per_token=flops_per_token(cfg, counts),
        counted="instantiated model (meta device)" if model is not None else "closed-form formula",
    )
    return out
