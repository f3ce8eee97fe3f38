"""Token-level scoring for evaluation: log-likelihoods of continuations, rolling document likelihoods.

Everything here works on token ids and a ``LogitsFn``: ``tokens [b, s] -> logits [b, s, V]`` (fp32), the
model's next-token logits at every position. The same code serves ``jtok-eval`` (a checkpoint loaded at one
rank) and the in-loop evaluator (the training model on every data-parallel rank).

A continuation's log-likelihood is the sum over its tokens of ``log softmax(logits)[target]`` at the
positions that predict them (the full vocabulary, as the training loss), and ``is_greedy`` says whether each
of its tokens is the argmax. Batches are right-padded: attention is causal and JTok/JTok-M rows depend only on
a position's own token, and MoE layers drop no tokens (no capacity factor), so padding never changes the
scores of real positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import Tensor

__all__ = ["LogitsFn", "ScoreRequest", "score_requests", "rolling_windows", "pad_batch"]

LogitsFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ScoreRequest:
    context: tuple[int, ...]        # conditioning tokens (at least one)
    continuation: tuple[int, ...]   # tokens to score (at least one)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> Tensor:
    """Right-pad token lists into [b, max len rounded up to ``multiple``] (int64)."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def _window(req: ScoreRequest, max_length: int) -> tuple[list[int], int]:
    """Model input (at most max_length tokens, left-truncated) and how many of its last positions score."""
    whole = list(req.context) + list(req.continuation)
    n = min(len(req.continuation), max_length)
    return whole[-(max_length + 1):][:-1], n


def score_requests(
    logits_fn: LogitsFn,
    requests: Sequence[ScoreRequest],
    max_length: int,
    batch_size: int,
    pad_id: int,
    num_batches: int | None = None,
    pad_multiple: int = 1,
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of every request, in order; batches of similar lengths (longest first).

    num_batches: run this many forwards even if fewer are needed (dummy one-token batches): ranks that
    must step together (expert parallel, sharded tables) call the model the same number of times.
    pad_multiple: pad the sequence length to a multiple of it (sequence parallelism splits the sequence).
    """
    for r in requests:
        if not r.context or not r.continuation:
            raise ValueError("a scored request needs at least one context and one continuation token")
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context) - len(requests[i].continuation))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if num_batches is not None:
        if num_batches < len(batches):
            raise ValueError(f"num_batches={num_batches} is fewer than the {len(batches)} batches needed")
        batches += [[] for _ in range(num_batches - len(batches))]
    with torch.no_grad():
        for batch in batches:
            if not batch:
                logits_fn(torch.full((1, pad_multiple), pad_id, dtype=torch.long))
                continue
            windows = [_window(requests[i], max_length) for i in batch]
            tokens = pad_batch([w for w, _ in windows], pad_id, pad_multiple)
            logprobs = torch.log_softmax(logits_fn(tokens).float(), dim=-1)
            for row, (i, (w, n)) in enumerate(zip(batch, windows)):
                target = torch.as_tensor(list(requests[i].continuation)[-n:], dtype=torch.long)
                lp = logprobs[row, len(w) - n: len(w)].cpu()
                ll = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (ll, greedy)
    return out  # type: ignore[return-value]


def rolling_windows(ids: Sequence[int], prefix_id: int, max_length: int) -> list[ScoreRequest]:
    """lm-eval's disjoint rolling windows over a document: every token scored once, the first one after
    ``prefix_id`` (end-of-document), each window with as much left context as fits in ``max_length``."""
    windows: Iterable = get_rolling_token_windows(token_list=list(ids), prefix_token=prefix_id,
                                                  max_seq_len=max_length, context_len=1)
    return [ScoreRequest(tuple(c), tuple(t)) for c, t in map(make_disjoint_window, windows)]
