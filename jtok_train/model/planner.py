"""Capacity planner: per-GPU memory, per-step exchange bytes and exchange time vs compute for a config on a cluster.

Everything here is arithmetic on the config (no model is built), written against what this framework
allocates and sends, so the figures can be checked against live runs (tests/distributed/test_planner_measured.py
does, on 2 gloo ranks):

Parallel layout: W GPUs = TP x PP x DP, EP divides DP; every pipeline stage holds L/PP layers and the JTok
tables of those layers, either replicated (a Megatron parameter on every rank of the stage) or row-sharded over
the stage's W/PP ranks (``parallel.embedding=sharded``: every rank stores ceil(V PP/W) rows of [L/PP, n_e, d]).
With PP the figures are per stage (the first holds the embedding, the last the final norm, the output layer (a
copy of the tied embedding) and the logits) and memory reports the stage that needs the most; activations are
those of the micro-batches a stage holds at its peak under 1F1B (stage r: min(PP - r, n_micro)), and the step
time adds the pipeline bubble (PP - 1 micro-batch slots, a share (PP - 1)/(n_micro + PP - 1)). With interleaved
stages (V model chunks per rank, each L/(PP V) layers with their own table) the peak is found by replaying
Megatron's interleaved schedule (``schedule_events``: forwards of chunk-micro-batches, each chunk weighted by its
activations, the last stage's last chunk with the logits), and the bubble is (PP - 1)/V micro-batch slots.

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
with U = dedup ratio x T_local and r = (W - 1) / W for uniform owners (or measured on real micro-batches with
the real row placement: ``measure_dedup``). Without dedup U = T_local.

Owner premix (the paper's variant, not implemented: BENCHMARKS.md) is estimated next to it for JTok-M: per
remote position the token id and per layer K weights + set ids go out and one blended d-vector comes back
(backward: its gradient out, K weight gradients back); 4 all-to-alls per layer, inside the forward/backward.

Time: compute per micro-batch = FLOPs per token x tokens / TP / (peak x MFU); exchange per micro-batch = bytes
over NVLink to same-node peers and over the inter-node network to the others, in parallel, plus a latency per
all-to-all. With overlap, micro-batch i+1's forward exchange and micro-batch i's gradient exchange run behind
compute: the exchange hides when it needs less time than one micro-batch's compute; the first forward and the
last gradient exchange stay exposed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = [
    "PlanError",
    "Cluster",
    "load_cluster",
    "cluster_names",
    "Layout",
    "layout",
    "params_per_rank",
    "memory_per_rank",
    "activation_bytes",
    "exchange_per_step",
    "step_timing",
    "default_dedup_ratio",
    "measure_dedup",
    "capacity_plan",
]

GiB = 2**30


class PlanError(ValueError):
    """A planner input is invalid; the message names it and the fix."""


# ------------------------------------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    name: str = "custom"
    gpus: int = 8
    "GPUs in the job (all ranks)."
    gpus_per_node: int = 8
    "GPUs per node (an all-to-all reaches gpus_per_node - 1 peers over the intra-node link)."
    memory_gib: float = 80.0
    "Memory per GPU, GiB."
    intra_node_GBps: float = 450.0
    "Intra-node bandwidth per GPU per direction, GB/s (NVLink)."
    inter_node_GBps: float = 50.0
    "Inter-node bandwidth per GPU per direction, GB/s (e.g. 400 Gb/s InfiniBand = 50 GB/s)."
    peak_tflops: float = 989.0
    "Dense peak per GPU in the training precision, TFLOP/s."
    mfu: float = 0.4
    "Assumed model FLOPs utilisation of the backbone."
    hbm_GBps: float = 3350.0
    "Memory bandwidth per GPU, GB/s (table optimizer traffic)."
    latency_us: float = 15.0
    "Fixed cost of one all-to-all, microseconds."


def cluster_dir() -> Path:
    from jtok_train.config import config_dir

    return config_dir() / "cluster"


def cluster_names() -> list[str]:
    d = cluster_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_cluster(name: Optional[str], overrides: Sequence[str] = ()) -> Cluster:
    """A preset from configs/cluster/<name>.yaml (or the defaults when name is None), then ``key=value``
    overrides (keys without the ``cluster.`` prefix). Unknown keys and bad values raise PlanError."""
    from omegaconf import OmegaConf

    known = {f.name for f in fields(Cluster)}
    data: dict[str, Any] = {}
    if name is not None:
        path = cluster_dir() / f"{name}.yaml"
        if not path.is_file():
            raise PlanError(f"cluster={name!r} is not a preset: choose one of {cluster_names()} (configs/cluster/) "
                            "or describe it with cluster.gpus=... cluster.memory_gib=...")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
        data.setdefault("name", name)
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq:
            raise PlanError(f"cluster override {o!r} needs a value: cluster.{key}=...")
        import yaml

        data[key] = yaml.safe_load(value) if value else value
    for key in data:
        if key not in known:
            import difflib

            hint = difflib.get_close_matches(key, known, n=1)
            raise PlanError(f"unknown cluster key cluster.{key}" + (f" (did you mean cluster.{hint[0]}?)" if hint else "")
                            + f"; keys: {sorted(known)}")
    c = Cluster(**{k: v for k, v in data.items()})
    for f in fields(Cluster):
        v = getattr(c, f.name)
        if f.name == "name":
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise PlanError(f"cluster.{f.name}={v!r} is invalid: must be a positive number")
    if c.mfu > 1:
        raise PlanError(f"cluster.mfu={c.mfu} is invalid: a fraction of the peak in (0, 1]")
    c.gpus, c.gpus_per_node = int(c.gpus), int(c.gpus_per_node)
    if c.gpus % c.gpus_per_node and c.gpus > c.gpus_per_node:
        raise PlanError(f"cluster.gpus={c.gpus} is not a multiple of cluster.gpus_per_node={c.gpus_per_node}")
    return c


# ------------------------------------------------------------------------------------------------- layout


@dataclass
class Layout:
    world: int
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    num_micro: int
    sequence_parallel: bool
    emb_world: int          # ranks the sharded tables are split over (the ranks of one pipeline stage)
    sharded: bool
    stage: Optional[int] = None   # the pipeline stage figured (memory_per_rank figures each; None: no PP)
    vpp: int = 1            # model chunks per rank (interleaved pipeline stages)

    @property
    def stage_layers(self) -> int:
        return self.num_layers // self.pp

    num_layers: int = 0

    @property
    def first_stage(self) -> bool:
        return self.stage is None or self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage is None or self.stage == self.pp - 1

    @property
    def in_flight(self) -> int:
        """Forwards whose activations a stage holds at its peak: under 1F1B stage r runs pp - r forwards before
        its first backward (at most the step's micro-batches); with interleaved stages these are forwards of
        model chunks, counted by replaying Megatron's schedule (``schedule_events``)."""
        if self.vpp == 1:
            return min(self.pp - (self.stage or 0), self.num_micro)
        return peak_in_flight(schedule_events(self.pp, self.vpp, self.stage or 0, self.num_micro), [1] * self.vpp)

    def chunk_in_flight(self) -> list[int]:
        """Per model chunk: its micro-batches between their forward and their backward at most."""
        events = schedule_events(self.pp, self.vpp, self.stage or 0, self.num_micro)
        return [peak_in_flight(events, [1 if c == k else 0 for c in range(self.vpp)]) for k in range(self.vpp)]


def schedule_events(pp: int, vpp: int, stage: int, num_micro: int) -> list[tuple[str, int]]:
    """The order of a pipeline stage's forward ("F") and backward ("B") passes, with the model chunk each runs,
    as Megatron-Core's schedules run them (checked on 0.16 and 0.19: ``get_pp_rank_microbatches`` and
    ``get_schedule_table`` in megatron/core/pipeline_parallel/schedules.py). 1F1B: pp - stage - 1 warm-up
    forwards, then forward/backward pairs, then the remaining backwards. Interleaved (vpp chunks, micro-batches
    in groups of pp per chunk): 2 (pp - stage - 1) + (vpp - 1) pp warm-up forwards of chunk-micro-batches; the
    backward of the k-th chunk-micro-batch runs chunk vpp - 1 - (the k-th forward's chunk)."""
    if pp == 1:
        return [e for _ in range(num_micro) for e in (("F", 0), ("B", 0))]
    if vpp == 1:
        fwd = [0] * num_micro
        warm = min(pp - stage - 1, num_micro)
    else:
        fwd = [c for g in range(0, num_micro, pp) for c in range(vpp) for _ in range(g, min(g + pp, num_micro))]
        warm = min(2 * (pp - stage - 1) + (vpp - 1) * pp, len(fwd))
    bwd = [vpp - 1 - c for c in fwd]
    events = [("F", c) for c in fwd[:warm]]
    for i in range(len(fwd) - warm):
        events += [("F", fwd[warm + i]), ("B", bwd[i])]
    return events + [("B", c) for c in bwd[len(fwd) - warm:]]


def peak_in_flight(events: list[tuple[str, int]], weight: list[float]) -> float:
    """The most a stage holds at once when a chunk's forward adds ``weight[chunk]`` and its backward frees it."""
    held = peak = 0.0
    for kind, c in events:
        held += weight[c] if kind == "F" else -weight[c]
        peak = max(peak, held)
    return peak


def layout(cfg: Any, world: int) -> Layout:
    from jtok_train.config import validate

    validate(cfg, world_size=world)
    p, t = cfg.parallel, cfg.train
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size
    if etp is None:
        etp = 1 if ep > 1 else tp
    dp = world // (tp * pp)
    vpp = int(p.virtual_pipeline_model_parallel_size or 1) if pp > 1 else 1
    return Layout(world=world, tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, expert_dp=max(1, world // (ep * etp * pp)),
                  num_micro=t.global_batch_size // (t.micro_batch_size * dp), sequence_parallel=bool(p.sequence_parallel),
                  emb_world=world // pp, sharded=p.embedding == "sharded" and cfg.jtok.variant != "none",
                  num_layers=cfg.model.num_layers, vpp=vpp)


# ------------------------------------------------------------------------------------------------- memory


def params_per_rank(cfg: Any, lay: Layout) -> dict[str, float]:
    """Parameters one rank holds, by role (the same shapes as accounting.formula_params)."""
    m, j = cfg.model, cfg.jtok
    d, V = m.hidden_size, m.vocab_size
    L = m.num_layers // lay.pp          # the layers of one pipeline stage (all of them without PP)
    first, last = lay.first_stage, lay.last_stage
    heads = m.num_attention_heads
    hd = d // heads
    groups = m.num_query_groups or heads
    norm = d if m.normalization == "RMSNorm" else 2 * d
    glu = 2 if m.gated_linear_unit else 1

    def mlp(width: int) -> int:
        return glu * d * width + width * d

    # the first stage holds the embedding, the last the final norm and the output layer (with tied embeddings
    # and PP a copy of the embedding, kept equal by Megatron's embedding group)
    untied_or_copy = m.untie_embeddings_and_output_weights or not first
    out = {
        "embedding": (V * d / lay.tp + (m.seq_length * d if m.position_embedding_type == "learned_absolute" else 0))
        if first else 0.0,
        "output_layer": V * d / lay.tp if last and untied_or_copy else 0.0,
        "attention": L * (d * (heads + 2 * groups) * hd + heads * hd * d) / lay.tp,
        "norms": L * 2 * norm + (norm if last else 0),
        "dense_mlp": 0.0, "moe_router": 0.0, "shared_expert": 0.0, "routed_experts": 0.0,
    }
    if m.num_experts:
        out["moe_router"] = L * d * m.num_experts
        if m.moe_shared_expert_intermediate_size:
            out["shared_expert"] = L * mlp(m.moe_shared_expert_intermediate_size) / lay.tp
        out["routed_experts"] = L * m.num_experts * mlp(m.moe_ffn_hidden_size) / (lay.ep * lay.etp)
    else:
        out["dense_mlp"] = L * mlp(m.ffn_hidden_size) / lay.tp
    out["jtok_dense"] = {"none": 0, "jtok": L * d, "jtokm": L * (d * j.num_sets + 2 * d)}[j.variant]
    table = L * j.num_sets * V * d if j.variant != "none" else 0
    out["table_rows_local"] = (math.ceil(V / lay.emb_world) if lay.sharded else V) if table else 0
    out["table"] = out["table_rows_local"] * L * j.num_sets * d if table else 0
    return out


def activation_bytes(cfg: Any, lay: Layout, unique_ratio: float, flash: Optional[bool] = None) -> dict[str, float]:
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


def _row_bytes(cfg: Any) -> int:
    """Bytes of one token's row on one pipeline stage: its layers' n_e vectors, fp32 (ShardedTokenTable)."""
    L = cfg.model.num_layers // cfg.parallel.pipeline_model_parallel_size
    return 4 * L * cfg.jtok.num_sets * cfg.model.hidden_size


def memory_per_rank(cfg: Any, lay: Layout, unique_ratio: float, flash: Optional[bool] = None) -> dict[str, Any]:
    """Bytes per GPU by component (see the module doc). With pipeline parallelism: the stage that needs the most
    (its figures, with ``stage`` and every stage's total in ``per_stage``)."""
    if lay.pp > 1 and lay.stage is None:
        stages = [_memory_of_stage(cfg, replace(lay, stage=r), unique_ratio, flash) for r in range(lay.pp)]
        worst = max(stages, key=lambda x: x["total"])
        return {**worst, "per_stage": [x["total"] for x in stages], "stages": stages}
    return _memory_of_stage(cfg, lay, unique_ratio, flash)


def _memory_of_stage(cfg: Any, lay: Layout, unique_ratio: float, flash: Optional[bool] = None) -> dict[str, Any]:
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
        T_local = cfg.model.seq_length * cfg.train.micro_batch_size / (lay.tp if lay.sequence_parallel else 1)
        U = unique_ratio * T_local
        overlap = 1 if cfg.parallel.overlap else 0
        # row gradients of up to (in-flight + 1) micro-batches: a stage adds one's to its shard once the next
        # has run its backward; with 1F1B up to pp - stage forwards run before the first backward. With
        # interleaved stages every model chunk has its own table (rows of its layers) and its own count.
        counts = [lay.in_flight] if lay.vpp == 1 else lay.chunk_in_flight()
        out["exchange_buffers"] = sum((3 + 2 * overlap + 2 * min(lay.num_micro, c + 1)) * U * _row_bytes(cfg) / lay.vpp
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


# ------------------------------------------------------------------------------------------------- exchange


_DESIGN_DEDUP = ((2048, 0.27), (4096, 0.22), (8192, 0.18), (16384, 0.14), (65536, 0.08))


def default_dedup_ratio(tokens: float) -> float:
    """unique/total ids per micro-batch measured in DESIGN.md (Python docs, 8K-50K BPE), log-interpolated."""
    pts = _DESIGN_DEDUP
    if tokens <= pts[0][0]:
        return min(1.0, pts[0][1] * (pts[0][0] / max(tokens, 1)) ** 0.3)
    for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
        if tokens <= t1:
            w = math.log(tokens / t0) / math.log(t1 / t0)
            return r0 + w * (r1 - r0)
    return pts[-1][1]


def exchange_per_step(cfg: Any, lay: Layout, unique_ratio: float, remote_fraction: Optional[float] = None) -> dict:
    """Per GPU per optimizer step, with dedup (at ``unique_ratio``) and without."""
    T_local = cfg.model.seq_length * cfg.train.micro_batch_size / (lay.tp if lay.sequence_parallel else 1)
    W = lay.emb_world
    r = (W - 1) / W if remote_fraction is None else remote_fraction
    rb = _row_bytes(cfg)

    def one(u: float) -> dict:
        remote = u * r
        ids, rows_fwd, grads = 8 * remote, remote * rb, remote * rb
        per_mb = ids + rows_fwd + grads
        return {"unique_per_microbatch": u, "remote_rows_per_microbatch": remote, "id_bytes": ids * lay.num_micro,
                "row_bytes_forward": rows_fwd * lay.num_micro, "grad_bytes_backward": grads * lay.num_micro,
                "bytes_sent": per_mb * lay.num_micro, "bytes_per_microbatch": per_mb,
                "forward_bytes_per_microbatch": ids + rows_fwd, "backward_bytes_per_microbatch": grads,
                "count_bytes": 8 * W * lay.num_micro}

    out = {"row_bytes": rb, "positions_per_microbatch": T_local, "remote_fraction": r, "unique_ratio": unique_ratio,
           "dedup": one(unique_ratio * T_local), "no_dedup": one(T_local), "premix": None}
    j = cfg.jtok
    if j.variant == "jtokm":
        # Owner premix (the paper's variant, not implemented here): per remote position the requester sends the
        # token id and, per layer, the K router weights and set ids (4 + 1 B each); the owner returns one blended
        # d-vector per layer. Backward: the d-vector's gradient goes to the owner, the K weight gradients come back.
        L, d, K = cfg.model.num_layers, cfg.model.hidden_size, j.top_k
        pos = T_local * r
        fwd = pos * (8 + L * 5 * K) + pos * L * 4 * d
        bwd = pos * L * (4 * d + 4 * K)
        out["premix"] = {"remote_positions_per_microbatch": pos, "forward_bytes_per_microbatch": fwd,
                         "backward_bytes_per_microbatch": bwd, "bytes_per_microbatch": fwd + bwd,
                         "bytes_sent": (fwd + bwd) * lay.num_micro, "all_to_alls_per_microbatch": 4 * L,
                         "vs_dedup": (fwd + bwd) / max(out["dedup"]["bytes_per_microbatch"], 1e-30)}
    return out


def _a2a_seconds(nbytes: float, cl: Cluster, W: int) -> float:
    if nbytes <= 0 or W <= 1:
        return 0.0
    g = min(cl.gpus_per_node, W)
    intra_share = (g - 1) / (W - 1)
    t_intra = nbytes * intra_share / (cl.intra_node_GBps * 1e9)
    t_inter = nbytes * (1 - intra_share) / (cl.inter_node_GBps * 1e9)
    return max(t_intra, t_inter) + cl.latency_us * 1e-6


def step_timing(cfg: Any, lay: Layout, cl: Cluster, flops_per_token: float, exch: dict) -> dict:
    tokens_mb = cfg.model.seq_length * cfg.train.micro_batch_size
    # one stage's share of a micro-batch's compute (its layers; the embedding and head are counted evenly)
    t_c = flops_per_token * tokens_mb / lay.tp / lay.pp / (cl.peak_tflops * 1e12 * cl.mfu)
    # 1F1B: the pipeline fills and drains, each stage idles (pp - 1) micro-batch slots per step; interleaved
    # stages fill and drain with chunk slots, 1/vpp of a micro-batch each (Narayanan et al. 2021, sec. 2.2)
    fill = (lay.pp - 1) * t_c / lay.vpp      # the pipeline bubble (0 without PP)
    bubble = fill / (lay.num_micro * t_c + fill) if fill else 0.0
    out = {"compute_s_per_microbatch": t_c, "num_microbatches": lay.num_micro, "pipeline_bubble_share": bubble,
           "pipeline_bubble_s": fill, "virtual_stages": lay.vpp}
    for key in ("dedup", "no_dedup"):
        e = exch[key]
        t_f = _a2a_seconds(e["forward_bytes_per_microbatch"], cl, lay.emb_world)
        t_b = _a2a_seconds(e["backward_bytes_per_microbatch"], cl, lay.emb_world)
        t_x = t_f + t_b
        n = lay.num_micro
        overlapped = n * t_c + t_f + t_b + (n - 1) * max(0.0, t_x - t_c) + fill
        serial = n * (t_c + t_f) + t_b + fill
        out[key] = {"exchange_s_per_microbatch": t_x, "forward_s": t_f, "backward_s": t_b,
                    "share_of_compute": t_x / t_c if t_c else math.inf, "hides_behind_compute": t_x <= t_c,
                    "step_s_overlap": overlapped, "step_s_no_overlap": serial,
                    "exposed_share_overlap": (overlapped - n * t_c) / overlapped,
                    "exposed_share_no_overlap": (serial - n * t_c) / serial}
    pm = exch.get("premix")
    if pm:
        # the weights depend on each layer's input: 2 all-to-alls per layer in the forward and 2 in the backward,
        # inside the computation (nothing prefetched); counted as fully exposed
        L = lay.stage_layers
        t_f = L * (_a2a_seconds(pm["forward_bytes_per_microbatch"] / L, cl, lay.emb_world) + cl.latency_us * 1e-6)
        t_b = L * (_a2a_seconds(pm["backward_bytes_per_microbatch"] / L, cl, lay.emb_world) + cl.latency_us * 1e-6)
        step = lay.num_micro * (t_c + t_f + t_b)
        out["premix"] = {"exchange_s_per_microbatch": t_f + t_b, "share_of_compute": (t_f + t_b) / t_c,
                         "step_s": step, "exposed_share": (step - lay.num_micro * t_c) / step}
    out["backbone_step_s"] = lay.num_micro * t_c + fill
    return out


# ------------------------------------------------------------------------------------------------- dedup from data


def measure_dedup(cfg: Any, prefix: str, world: int, micro_batches: int = 64, tokenizer: Optional[str] = None,
                  train_samples: Optional[int] = None, valid_samples: int = 0) -> dict:
    """unique/total ids per micro-batch and the remote share of the unique ids, on the training micro-batches
    the trainer would read first (Megatron GPTDataset order, this config's seq_length, micro-batch size and seed),
    with the real row placement over ``world`` ranks. Micro-batch j goes to data-parallel rank j mod DP (the
    trainer's order); with TP + sequence parallelism each TP rank asks for its own sequence slice.
    ``train_samples`` / ``valid_samples``: the dataset sizes to build (the trainer's, train_iters x global batch and
    eval_samples, give the trainer's exact sample order; the default builds just enough samples)."""
    import numpy as np
    import torch

    from jtok_train.data.datasets import build_datasets, get_microbatch
    from jtok_train.data.tokenizer import load_tokenizer
    from jtok_train.parallel.placement import RowPlacement

    lay = layout(cfg, world)
    tok_path = tokenizer or (cfg.data.tokenizer if Path(str(cfg.data.tokenizer)).is_file() else None) \
        or str(Path(prefix).parent / "tokenizer.json")
    if not Path(tok_path).is_file():
        raise PlanError(f"dedup_from={prefix}: no tokenizer at {tok_path}; set data.tokenizer=<the tokenizer.json "
                        "the data was built with>")
    tok = load_tokenizer(tok_path)
    m, s = cfg.train.micro_batch_size, cfg.model.seq_length
    if micro_batches < 1:
        raise PlanError(f"dedup_samples={micro_batches} is invalid: measure at least 1 micro-batch")
    train_ds, _ = build_datasets([prefix], tok, seq_length=s, seed=cfg.train.seed,
                                 train_samples=max(train_samples or 0, micro_batches * m), valid_samples=valid_samples,
                                 split=cfg.data.split, cache_dir=cfg.data.cache_dir)
    placement = RowPlacement(cfg.model.vocab_size, lay.emb_world, cfg.jtok.table_seed)
    tp = lay.tp if lay.sequence_parallel else 1
    ratios, remote, unique, positions = [], [], [], []
    for jmb in range(micro_batches):
        ids = get_microbatch(train_ds, list(range(jmb * m, (jmb + 1) * m)))["tokens"]
        if int(ids.max()) >= cfg.model.vocab_size:
            raise PlanError(f"dedup_from={prefix}: token id {int(ids.max())} >= model.vocab_size={cfg.model.vocab_size}")
        flat = ids.t().reshape(-1).view(s, m)
        dp_rank = jmb % lay.dp
        for t in range(tp):
            part = flat[t * (s // tp):(t + 1) * (s // tp)].reshape(-1)
            u = torch.unique(part)
            requester = dp_rank * lay.tp + (t if tp > 1 else 0)
            owners = placement.owner(u)
            ratios.append(u.numel() / part.numel())
            remote.append(float((owners != requester).float().mean()))
            unique.append(u.numel())
            positions.append(part.numel())
    ratios_a = np.array(ratios)
    return {"prefix": str(prefix), "micro_batches": micro_batches, "tokens_per_microbatch": m * s // tp,
            "unique_ratio": float(np.sum(unique) / np.sum(positions)), "unique_ratio_p5": float(np.percentile(ratios_a, 5)),
            "unique_ratio_p95": float(np.percentile(ratios_a, 95)),
            "remote_fraction": float(np.dot(remote, unique) / np.sum(unique)), "world": lay.emb_world}


# ------------------------------------------------------------------------------------------------- the plan


def capacity_plan(cfg: Any, cluster: Cluster, flops_per_token: float, dedup_ratio: Optional[float] = None,
                  dedup_measured: Optional[dict] = None, flash: Optional[bool] = None) -> dict:
    """Memory per GPU, exchange bytes per step and exchange vs compute time for ``cfg`` on ``cluster``."""
    lay = layout(cfg, cluster.gpus)
    T_local = cfg.model.seq_length * cfg.train.micro_batch_size / (lay.tp if lay.sequence_parallel else 1)
    remote = None
    if dedup_measured is not None:
        ratio, source, remote = dedup_measured["unique_ratio"], f"measured on {dedup_measured['prefix']}", \
            dedup_measured["remote_fraction"]
    elif dedup_ratio is not None:
        if not 0 < dedup_ratio <= 1:
            raise PlanError(f"dedup_ratio={dedup_ratio} is invalid: unique/total ids per micro-batch, in (0, 1]")
        ratio, source = dedup_ratio, "given"
    else:
        ratio, source = default_dedup_ratio(T_local), f"default (DESIGN.md's measurement at {T_local:.0f} tokens)"
    if not cfg.parallel.dedup:
        ratio, source = 1.0, "parallel.dedup=false"
    mem = memory_per_rank(cfg, lay, ratio, flash)
    exch = exchange_per_step(cfg, lay, ratio, remote) if lay.sharded else None
    timing = step_timing(cfg, lay, cluster, flops_per_token, exch) if exch else None
    capacity = cluster.memory_gib * GiB
    return {
        "cluster": asdict(cluster),
        "layout": asdict(lay),
        "dedup": {"unique_ratio": ratio, "source": source, **({"measured": dedup_measured} if dedup_measured else {})},
        "memory": mem,
        "memory_capacity": capacity,
        "fits": mem["total"] <= capacity,
        "headroom": capacity - mem["total"],
        "exchange": exch,
        "timing": timing,
        "table_optimizer": _table_optimizer_traffic(cfg, lay, cluster, ratio) if lay.sharded else None,
    }


def _table_optimizer_traffic(cfg: Any, lay: Layout, cl: Cluster, ratio: float) -> dict:
    """Bytes the table optimizer reads and writes per step: dense AdamW touches the whole shard (p, g, m, v read;
    p, m, v written), sparse AdamW the rows that got a gradient (plus gathering and scattering them)."""
    rows = math.ceil(cfg.model.vocab_size / lay.emb_world)
    rb = _row_bytes(cfg)
    T_local = cfg.model.seq_length * cfg.train.micro_batch_size / (lay.tp if lay.sequence_parallel else 1)
    # ids a step touches on one owner: at most every requester's unique ids spread over W owners
    touched = min(rows, ratio * T_local * lay.num_micro * lay.world / lay.emb_world)
    dense = 7 * rows * rb
    sparse = 15 * touched * rb
    bw = cl.hbm_GBps * 1e9
    return {"kind": cfg.jtok.table_optimizer, "rows_per_rank": rows, "touched_rows_upper_bound": touched,
            "adamw_bytes": dense, "sparse_adamw_bytes": sparse, "adamw_s": dense / bw, "sparse_adamw_s": sparse / bw}
