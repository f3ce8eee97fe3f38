"""Inference: load a checkpoint at world size 1, generate with Megatron-Core's KV cache, JTok tables in host
memory (only the current tokens' rows cross to the device)."""

from jtok_train.inference.generation import GenerationOutput, SamplingParams, filter_logits, generate, sample_next
from jtok_train.tables.host import HostTokenTable, TransferStats, bytes_per_token
from jtok_train.inference.loading import TABLE_PLACEMENTS, LoadedModel, load_for_inference, place_tables, resolve_checkpoint

__all__ = [
    "GenerationOutput", "SamplingParams", "filter_logits", "generate", "sample_next",
    "HostTokenTable", "TransferStats", "bytes_per_token",
    "TABLE_PLACEMENTS", "LoadedModel", "load_for_inference", "place_tables", "resolve_checkpoint",
]
