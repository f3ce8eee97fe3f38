"""The parallel layout a plan is figured for, and the pipeline schedule it replays.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jtok_train.config import RunConfig
from jtok_train.config.schema import validate

__all__ = ["Layout", "layout", "schedule_events", "peak_in_flight"]


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


def layout(cfg: RunConfig, world: int) -> Layout:
    """The layout of ``cfg`` on ``world`` ranks (the config validated for that world size)."""
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

