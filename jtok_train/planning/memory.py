"""Memory per GPU: the parameters one rank holds (by role, from ``formulas.param_roles``), the bytes autograd
saves for backward, the sharded tables and the exchange buffers.

Memory per GPU (bytes):
- backbone parameters per rank: embedding and output layer / TP (vocabulary-parallel), attention and dense MLP
  / TP, shared experts / TP, routed experts / (EP x expert-TP), norms, MoE routers and JTok's scales/routers
  replicated;
- gradients: Megatron DDP's gradient buffer, fp32 (``grad_reduce_in_fp32``);
- optimizer states (Megatron AdamW): fp32 training 8 B/param (m, v); bf16 12 B/param (fp32 main copy + m + v);
  with ``parallel.use_distributed_optimizer`` 12 B/param in either precision (it keeps an fp32 main shard even
  in fp32 training) divided by the data-parallel size (experts: expert-DP size);
- sharded tables (fp32, as ShardedTokenTable allocates them): shard + its gradient (+1 B/row "touched" flag) +
  the table optimizer's two moments and an int64 step per row. ``sparse_adamw`` allocates the same moments as
  ``adamw`` (lazy *updates*, not lazy allocation): it saves optimizer *traffic* per step, not memory;
- replicated tables: part of the backbone's parameters, gradients and optimizer states (precision as above);
- activations of one micro-batch (no pipeline: one micro-batch is in flight), counted tensor by tensor from what
  autograd saves for backward in Megatron's local layer spec (RMSNorm, SwiGLU, no dropout: hidden and attention
  dropout are 0), in the spirit of Korthikanti et al. 2022 (their 34 sbh + 5 a s^2 b assumes dropout masks and a
  4h GELU MLP; ours is the same bookkeeping for this layer). T = micro-batch tokens, B = bytes per activation
  element (4 fp32, 2 bf16), Bn = 4 (torch's RMSNorm keeps fp32 copies), Bt = bytes of a table row element (4 for
  the fp32 sharded shard), per layer:
      attention  (2 Bn + B) T d + (2 + 3 g/a + 1) T d B + 8 T (norm stats) + 4 B s d/a (RoPE)
                 + a s^2 b (4, + 2 in bf16: fp32 softmax and its bf16 copy) + s^2 (causal mask)
                 (a fused flash-attention kernel, ``attention=flash``, keeps 4 a s b softmax statistics instead)
      FFN norm   2 T d Bn
      dense MLP  T (d + 5 f) B                      (gated; non-gated T (d + 2 f) B)
      MoE        router/dispatch 9 T E + 28 T k;  routed rows R = T k (x expert-TP / TP with sequence
                 parallelism: the shard's tokens are gathered over the expert-TP group): R (d + 6 f_e / ETP) B + 4 R;
                 shared expert T (d + 5 f_s) B
      JTok       2 T d B + 2 U d Bt + 8 U  (gate input and output; the rows and their normalised copy)
      JTok-M     2 T d Bn + 2 T d B + K T d Bt + T (4 + 4 n_e + 28 K)
  plus once: logits 4 T V (fp32 for the loss), final norm and output input (2 Bn + B) T d, ids and masks 17 T
  (+ 8 U and 8 T with JTok, + T with TP: the vocabulary-parallel mask). TP divides the per-layer terms (with sequence parallelism all of them, else the
  inner ones) and the logits. Activation recompute (``model.recompute_*``, Megatron's): full recompute
  keeps only each checkpointed chunk's input T d B (uniform: ceil(L/n) chunks over all layers; block: the first
  n layers one by one) and re-materialises one chunk during its backward (``recompute_working``, n layers,
  counted in the total); selective drops core_attn's a s^2 b terms, layernorm's fp32 norm copies (the norm
  outputs are discarded after use), and replaces moe / mlp / shared_experts by their input T d B. Tested against
  autograd's saved tensors on CPU runs (fp32 MoE + JTok-M, bf16 dense + JTok, TP 2 + sequence parallel) within 5%. On a GPU a fused RMSNorm
  keeps its input in bf16 (Bn = B), so the bf16 figure is an overestimate by 4 T d bytes per norm and layer
  (12 T d with JTok-M's router norm: 2.6 GiB for moe_17b_a2b at 4,096 tokens per micro-batch).
- exchange buffers (sharded tables) at the peak: the current micro-batch's received, served and re-ordered rows
  (3 U rows), the prefetched next one (2 U, with overlap), and the row gradients sent and received (2 U per
  micro-batch) of at most two micro-batches: the table adds a micro-batch's gradients to its shard once the
  next one has run its backward, so they do not pile up over the step:
  (3 + 2 overlap + 2 min(n_micro, 2)) U row_bytes.

Exchange bytes per step per GPU (what ExchangeStats counts as bytes_sent): per micro-batch, the remote unique ids
(8 B each), the rows this rank serves to others and the row gradients it sends back,
    bytes_sent = U_remote (8 + row_bytes) + U_served_remote row_bytes ~= 2 U r row_bytes + 8 U r
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

from jtok_train.config import RunConfig
from jtok_train.planning.formulas import param_roles
from jtok_train.planning.layout import Layout, peak_in_flight, schedule_events

__all__ = ["params_per_rank", "activation_bytes", "row_bytes", "memory_per_rank", "local_positions"]


def params_per_rank(cfg: RunConfig, lay: Layout) -> dict[str, float]:
    """Parameters one rank holds, by role: ``formulas.param_roles`` of one pipeline stage's layers, split over
    the ranks that shard them."""
    r = param_roles(cfg)
    L = lay.stage_layers                # the layers of one pipeline stage (all of them without PP)
    first, last = lay.first_stage, lay.last_stage
    # the first stage holds the embedding, the last the final norm and the output layer (with tied embeddings
    # and PP a copy of the embedding, kept equal by Megatron's embedding group)
    untied_or_copy = cfg.model.untie_embeddings_and_output_weights or not first
    out = {
        "embedding": (r.embedding / lay.tp + r.position) if first else 0.0,
        "output_layer": r.embedding / lay.tp if last and untied_or_copy else 0.0,
        "attention": L * r.attention / lay.tp,
        "norms": L * r.norms + (r.final_norm if last else 0),
        "dense_mlp": L * r.dense_mlp / lay.tp,
        "moe_router": L * r.moe_router,
        "shared_expert": L * r.shared_expert / lay.tp,
        "routed_experts": L * r.routed_experts / (lay.ep * lay.etp),
        "jtok_dense": L * r.jtok_dense,
    }
    V = cfg.model.vocab_size
    out["table_rows_local"] = (math.ceil(V / lay.emb_world) if lay.sharded else V) if r.table_row else 0
    out["table"] = out["table_rows_local"] * L * r.table_row
    return out


def local_positions(cfg: RunConfig, lay: Layout) -> float:
    """Token positions of one micro-batch on one rank (its sequence shard with sequence parallelism)."""
    return cfg.model.seq_length * cfg.train.micro_batch_size / (lay.tp if lay.sequence_parallel else 1)


def activation_bytes(cfg: RunConfig, lay: Layout, unique_ratio: float, flash: Optional[bool] = None) -> dict[str, float]:
    """Bytes saved for backward by one micro-batch's forward on one rank (see the module doc). ``flash``: a fused
    (flash) attention kernel keeps only the output and the softmax statistics (4 a s b bytes) instead of the
    a s^2 b probabilities; default: on for model.transformer_impl=transformer_engine, off for the local spec."""
    if flash is None:
        flash = getattr(cfg.model, "transformer_impl", "local") == "transformer_engine"
    m, j = cfg.model, cfg.jtok
    bf16 = cfg.train.precision == "bf16"
    B = 2 if bf16 else 4     # activations in the training precision
    Bn = 4                   # torch's RMSNorm keeps fp32 copies of its input and output (bf16 input upcast)
    Bt = 4 if lay.sharded else B   # gathered table rows: the sharded shard is fp32, a replicated table is a param
    d, V, s, b = m.hidden_size, m.vocab_size, m.seq_length, cfg.train.micro_batch_size
    L = m.num_layers // lay.pp          # one pipeline stage's layers
    a = m.num_attention_heads
    g = m.num_query_groups or a
    T = s * b
    sp = lay.tp if lay.sequence_parallel else 1   # divides the layer's input-sized terms
    tp = lay.tp                                    # divides the inner terms
    U = unique_ratio * T / sp
    # local spec: softmax in fp32 (Megatron's attention_softmax_in_fp32), a bf16 copy for the bmm, a causal mask
    scores = 4 * a * s * b if flash else a * s * s * b * (4 + (2 if bf16 else 0)) + s * s * tp
    attn = (2 * T * d * Bn + T * d * B + 8 * T) / sp + ((2 + 3 * g / a) * T * d * B + T * d * B + scores) / tp \
        + 4 * B * s * d / a
    ffn_norm = 2 * T * d * Bn / sp
    glu = m.gated_linear_unit
    mlp = moe = 0.0
    if m.num_experts:
        k, E, fe = m.moe_router_topk, m.num_experts, m.moe_ffn_hidden_size
        # routed rows per rank: the sequence shard's tokens gathered over the expert-TP group (Megatron's MoE with
        # TP requires sequence parallelism), then spread over the EP ranks (balanced on average)
        R = T * k / sp * lay.etp
        moe = (9 * T * E + 28 * T * k) / sp + R * (d * B + 6 * fe * B / lay.etp + 4)
        if m.moe_shared_expert_intermediate_size:
            fs = m.moe_shared_expert_intermediate_size
            moe += T * d * B / sp + T * (5 if glu else 2) * fs * B / tp
    else:
        f = m.ffn_hidden_size
        mlp = T * d * B / sp + T * (5 if glu else 2) * f * B / tp
    jt = 0.0
    if j.variant == "jtok":
        jt = (2 * T * d * B + 2 * U * d * Bt + 8 * U) / sp
    elif j.variant == "jtokm":
        jt = (2 * T * d * Bn + 2 * T * d * B + j.top_k * T * d * Bt + T * (4 + 4 * j.num_sets + 28 * j.top_k)) / sp
    granularity = getattr(m, "recompute_granularity", None)
    if granularity == "selective":
        mods = set(getattr(m, "recompute_modules", None) or ["core_attn"])
        chunk_in = T * d * B / sp              # what a checkpointed submodule keeps: its input
        if "core_attn" in mods:
            attn -= scores / tp
        if "layernorm" in mods:               # the norms' fp32 copies go; their outputs are freed after use
            attn -= 2 * T * d * Bn / sp
            ffn_norm = 0.0
        if "mlp" in mods and not m.num_experts:
            mlp = chunk_in
        if "moe" in mods and m.num_experts:
            moe = chunk_in
        elif "shared_experts" in mods and m.num_experts and m.moe_shared_expert_intermediate_size:
            fs = m.moe_shared_expert_intermediate_size
            moe -= T * d * B / sp + T * (5 if glu else 2) * fs * B / tp - chunk_in
    per_layer = attn + ffn_norm + mlp + moe + jt
    # per forward of a model chunk (the whole stage without interleaving): its token ids, masks and table lookup
    once = 17 * T
    if j.variant != "none":
        once += 8 * U + (8 * T if j.variant == "jtok" else 0)
    # the last chunk of the last stage: logits, the final norm and the loss
    head = 4 * T * V / tp + (2 * T * d * Bn + T * d * B) / sp + (T if tp > 1 else 0) if lay.last_stage else 0.0
    Lc = L // lay.vpp                   # the layers of one model chunk (Megatron recomputes within a chunk)
    chunk_saved, working = Lc * per_layer, 0.0
    if granularity == "full":
        n = int(m.recompute_num_layers)
        if m.recompute_method == "uniform":
            chunks, recomputed = math.ceil(Lc / n), Lc
        else:                                   # block: the first n layers, one checkpoint each
            chunks = recomputed = min(n, Lc)
        chunk_saved = chunks * T * d * B / sp + (Lc - recomputed) * per_layer
        working = (n if m.recompute_method == "uniform" else 1) * per_layer
    per_chunk = [chunk_saved + once + (head if c == lay.vpp - 1 else 0.0) for c in range(lay.vpp)]
    if lay.vpp == 1:
        total = lay.in_flight * per_chunk[0]
    else:
        total = peak_in_flight(schedule_events(lay.pp, lay.vpp, lay.stage or 0, lay.num_micro), per_chunk)
    return {"per_layer": per_layer, "attention": L * attn, "ffn_norm": L * ffn_norm, "mlp": L * (mlp + moe),
            "jtok": L * jt, "logits_and_head": lay.vpp * once + head, "saved_by_layers": lay.vpp * chunk_saved,
            "recompute_working": working, "per_microbatch": sum(per_chunk), "per_chunk": per_chunk,
            "in_flight": lay.in_flight, "total": total}


def row_bytes(cfg: RunConfig) -> int:
    """Bytes of one token's row on one pipeline stage: its layers' n_e vectors, fp32 (ShardedTokenTable)."""
    L = cfg.model.num_layers // cfg.parallel.pipeline_model_parallel_size
    return 4 * L * param_roles(cfg).table_row


def memory_per_rank(cfg: RunConfig, lay: Layout, unique_ratio: float, flash: Optional[bool] = None) -> dict[str, Any]:
    """Bytes per GPU by component (see the module doc). With pipeline parallelism: the stage that needs the most
    (its figures, with ``stage`` and every stage's total in ``per_stage``)."""
    if lay.pp > 1 and lay.stage is None:
        stages = [_memory_of_stage(cfg, replace(lay, stage=r), unique_ratio, flash) for r in range(lay.pp)]
        worst = max(stages, key=lambda x: x["total"])
        return {**worst, "per_stage": [x["total"] for x in stages], "stages": stages}
    return _memory_of_stage(cfg, lay, unique_ratio, flash)


def _memory_of_stage(cfg: RunConfig, lay: Layout, unique_ratio: float, flash: Optional[bool] = None) -> dict[str, Any]:
    p = params_per_rank(cfg, lay)
    bf16 = cfg.train.precision == "bf16"
    pbytes, opt_bytes = (2, 12) if bf16 else (4, 8)
    distopt = bool(cfg.parallel.use_distributed_optimizer)
    if distopt:
        opt_bytes = 12   # the distributed optimizer keeps an fp32 main shard in fp32 training too (measured)
    dense = sum(v for k, v in p.items() if k not in ("routed_experts", "table", "table_rows_local"))
    experts = p["routed_experts"]
    table_params = 0 if lay.sharded else p["table"]
    backbone = dense + experts + table_params
    opt = opt_bytes * ((dense + table_params) / (lay.dp if distopt else 1) + experts / (lay.expert_dp if distopt else 1))
    out: dict[str, Any] = {
        "params": backbone * pbytes,
        "grads": backbone * 4,
        "optimizer": opt,
        "table": 0.0, "table_grad": 0.0, "table_optimizer": 0.0, "exchange_buffers": 0.0,
    }
    if lay.sharded:
        rows = p["table_rows_local"]
        shard = 4.0 * p["table"]
        out["table"] = shard
        out["table_grad"] = shard + rows            # shard_grad + the per-row touched flag
        out["table_optimizer"] = 2 * shard + 8 * rows   # exp_avg, exp_avg_sq, int64 step per row
        U = unique_ratio * local_positions(cfg, lay)
        overlap = 1 if cfg.parallel.overlap else 0
        # row gradients of up to (in-flight + 1) micro-batches: a stage adds one's to its shard once the next
        # has run its backward; with 1F1B up to pp - stage forwards run before the first backward. With
        # interleaved stages every model chunk has its own table (rows of its layers) and its own count.
        counts = [lay.in_flight] if lay.vpp == 1 else lay.chunk_in_flight()
        out["exchange_buffers"] = sum((3 + 2 * overlap + 2 * min(lay.num_micro, c + 1)) * U * row_bytes(cfg) / lay.vpp
                                      for c in counts)
    act = activation_bytes(cfg, lay, unique_ratio, flash)
    out["activations"] = act["total"]
    out["recompute_working"] = act["recompute_working"]   # one chunk re-materialised in the backward
    out["total"] = sum(v for v in out.values())
    out["stage"] = lay.stage
    out["activation_breakdown"] = act
    out["params_by_role"] = p
    out["backbone_params_per_rank"] = backbone
    return out

