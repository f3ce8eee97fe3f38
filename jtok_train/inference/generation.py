"""Autoregressive generation with Megatron-Core's KV cache.

The KV cache is Megatron's own: a ``StaticInferenceContext`` passed as ``inference_context`` to
``GPTModel.forward``. Megatron's attention allocates each layer's key/value memory on the first forward
(prefill: the whole prompt, causal), appends at ``sequence_len_offset`` on every later one (decode: one new
token per sequence), and the model returns only the last position's logits. Our JTok layer passes every
argument through to Megatron's ``TransformerLayer``, and the JTok rows depend only on the current token, so
JTok/JTok-M need no cache of their own: each decode step looks up the new token's rows (the provider's
``prefetch`` starts that lookup before the forward, as soon as the token is sampled).

``use_cache=False`` recomputes the whole sequence every step (the reference the cache is tested against).

Decoding: ``temperature == 0`` is greedy (argmax); otherwise logits / temperature, then top-k, then top-p
(nucleus) filtering, and a draw from a ``torch.Generator`` seeded with ``seed`` (reproducible).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from torch import Tensor

from jtok_train.tables.rows import TokenRowProvider

__all__ = ["SamplingParams", "GenerationOutput", "generate", "filter_logits", "sample_next"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = no top-k filter
    top_p: float = 1.0         # 1 = no nucleus filter
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} is invalid: use 0 (greedy) or a positive value")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is invalid: use 0 (off) or a positive number of tokens")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is invalid: use a value in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationOutput:
    tokens: Tensor                    # [b, prompt + new] (finished sequences padded with eos_id)
    num_new: int                      # new tokens per sequence (decode loop iterations)
    prefill_s: float                  # prompt forward + first token
    decode_s: float                   # every later token (forward + sampling)
    decode_steps: int                 # forwards in decode_s
    decode_cpu_s: float = 0.0         # CPU time of this process during decode_s
    step_s: list[float] = field(default_factory=list)         # wall time of each decode step (time_steps=True)
    step_logits: list[Tensor] = field(default_factory=list)   # [b, V] per new token (return_logits=True)
    transfer: dict[str, float] = field(default_factory=dict)  # host table: what crossed to the device

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps * self.tokens.shape[0] / self.decode_s if self.decode_s > 0 else 0.0


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k and outside the smallest set with probability >= top_p to -inf."""
    out = logits.clone()
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs      # mass of the strictly better tokens
        drop_sorted = before >= top_p                     # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out[drop] = float("-inf")
    return out


def sample_next(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> Tensor:
    """logits [b, V] -> next ids [b] (int64)."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).view(-1).to(logits.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_last(model: Any, tokens: Tensor, positions: Tensor, context: Any) -> Tensor:
    """Logits of the last position, [b, V]."""
    if context is None:
        out = model(tokens, positions, None)
    else:
        out = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
    return out[:, -1].float()


@torch.no_grad()
def generate(
    model: Any,
    prompt_ids: Tensor,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    use_cache: bool = True,
    eos_id: Optional[int] = None,
    provider: Optional[TokenRowProvider] = None,
    vocab_limit: Optional[int] = None,
    max_sequence_length: Optional[int] = None,
    return_logits: bool = False,
    forced_tokens: Optional[Tensor] = None,
    time_steps: bool = False,
) -> GenerationOutput:
    """Continue ``prompt_ids`` ([b, s] or [s], equal-length prompts) by ``max_new_tokens`` tokens.

    provider: the model's token-row provider (None for a model without JTok): prefetched before each forward,
    and what it counted during the call reported (``GenerationOutput.transfer``: the host table's transfer).
    vocab_limit: sample only ids below it (the tokenizer's vocabulary, when the model's is padded).
    eos_id: a sequence that produced it stops (the loop ends when all have).
    max_sequence_length: the KV cache's length (default: prompt + max_new_tokens).
    forced_tokens: [b, max_new_tokens] ids to append instead of the sampled ones (teacher forcing: the same
    work per step as decoding, on a fixed continuation; benchmarks compare models on it). time_steps: record
    each decode step's wall time (synchronises the device every step).
    """
    device = next(iter(model.parameters())).device
    tokens, forced_tokens = _checked_inputs(prompt_ids, max_new_tokens, max_sequence_length, forced_tokens, device)
    b, s = tokens.shape
    run = _Decoding(model, provider, sampling, eos_id, vocab_limit, return_logits, forced_tokens, device,
                    StaticInferenceContext(b, s + max_new_tokens) if use_cache else None)
    if provider is not None:
        provider.pop_stats()    # count this call's transfer only
    _sync(device)
    t0 = time.perf_counter()
    tokens = run.append(tokens, run.forward(tokens, torch.arange(s, device=device).unsqueeze(0).expand(b, s)), 0)
    num_new, decode_steps = 1, 0
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    step_s: list[float] = []
    while num_new < max_new_tokens and not (eos_id is not None and bool(run.finished.all())):
        ts = time.perf_counter()
        cur = tokens.shape[1]
        if run.context is not None:     # the KV cache holds the rest: only the last token goes in
            step_ids = tokens[:, -1:]
            step_pos = torch.full((b, 1), cur - 1, device=device, dtype=torch.long)
            run.context.enable_decode_mode()
        else:
            step_ids = tokens
            step_pos = torch.arange(cur, device=device).unsqueeze(0).expand(b, cur)
        tokens = run.append(tokens, run.forward(step_ids, step_pos), num_new)
        num_new += 1
        decode_steps += 1
        if time_steps:
            _sync(device)
            step_s.append(time.perf_counter() - ts)
    _sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    transfer = provider.pop_stats() if provider is not None else {}
    return GenerationOutput(tokens=tokens.cpu(), num_new=num_new, prefill_s=t1 - t0, decode_s=t2 - t1,
                            decode_steps=decode_steps, decode_cpu_s=c2 - c1, step_s=step_s,
                            step_logits=run.step_logits, transfer=transfer)


def _checked_inputs(prompt_ids: Tensor, max_new_tokens: int, max_sequence_length: Optional[int],
                    forced_tokens: Optional[Tensor], device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """The prompt as [b, s] ids on ``device`` and the forced continuation as [b, n], or a ValueError naming the
    bad value and the fix."""
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids.unsqueeze(0)
    if prompt_ids.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: use a positive number")
    tokens = prompt_ids.to(device=device, dtype=torch.long)
    b, s = tokens.shape
    total = s + max_new_tokens
    if max_sequence_length is not None and total > max_sequence_length:
        raise ValueError(f"the prompt ({s} tokens) + max_new_tokens={max_new_tokens} = {total} exceeds the "
                         f"model's sequence length {max_sequence_length}: shorten the prompt or lower "
                         "max_new_tokens")
    if forced_tokens is not None:
        forced_tokens = forced_tokens.to(device=device, dtype=torch.long).view(b, -1)
        if forced_tokens.shape[1] < max_new_tokens:
            raise ValueError(f"forced_tokens has {forced_tokens.shape[1]} tokens per sequence, fewer than "
                             f"max_new_tokens={max_new_tokens}")
    return tokens, forced_tokens


class _Decoding:
    """One generate call's state: the KV cache's context, the sampler, which sequences produced eos, and the
    logits kept per step (``return_logits``)."""

    def __init__(self, model: Any, provider: Optional[TokenRowProvider], sampling: SamplingParams,
                 eos_id: Optional[int], vocab_limit: Optional[int], return_logits: bool,
                 forced_tokens: Optional[Tensor], device: torch.device, context: Any):
        self.model, self.provider, self.sampling, self.eos_id = model, provider, sampling, eos_id
        self.vocab_limit, self.return_logits, self.forced_tokens, self.context = (vocab_limit, return_logits,
                                                                                 forced_tokens, context)
        self.generator = None if sampling.greedy else torch.Generator(device=device).manual_seed(int(sampling.seed))
        self.step_logits: list[Tensor] = []
        self.finished: Tensor | None = None

    def forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        """The last position's logits for ``ids`` (the provider's rows prefetched first); the cache advances."""
        if self.provider is not None:
            self.provider.prefetch(ids)
        logits = _forward_last(self.model, ids, positions, self.context)
        if self.context is not None:
            self.context.increment_sequence_len_offset(ids.shape[1])
        return logits

    def append(self, tokens: Tensor, logits: Tensor, index: int) -> Tensor:
        """``tokens`` with the index-th new token (sampled, or forced) appended; a finished sequence gets eos."""
        if self.finished is None:
            self.finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = logits[:, :self.vocab_limit]
        if self.return_logits:
            self.step_logits.append(logits.detach().cpu())
        if self.forced_tokens is None:
            nxt = sample_next(logits, self.sampling, self.generator)
        else:
            nxt = self.forced_tokens[:, index]
        if self.eos_id is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.eos_id), nxt)
            self.finished |= nxt == self.eos_id
        return torch.cat([tokens, nxt[:, None]], dim=1)
