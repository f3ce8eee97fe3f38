"""lm-evaluation-harness models over jtok-train.

* ``TokenScoringLM``: an lm-eval ``LM`` over a tokenizer and a ``LogitsFn`` (scoring.py): loglikelihood,
  loglikelihood_rolling and, when it is given a generator, generate_until. Batched.
* ``JTokLM`` (registered as ``jtok``): a checkpoint loaded the way ``jtok-generate`` loads it (any saved
  layout, rebuilt at one rank; JTok tables in host memory by default; Megatron's KV cache for generation).

    lm_eval.simple_evaluate(model="jtok", model_args="checkpoint=runs/demo", tasks=["demo_cloze"])
    jtok-lm-eval --model jtok --model_args checkpoint=runs/demo --tasks demo_cloze      (lm-eval's own CLI)

Importing ``jtok_train.evaluation`` registers the model; lm-eval 0.4 discovers models only by import.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from jtok_train.data.tokenizer import load_tokenizer
from jtok_train.errors import CheckpointError, UsageError
from jtok_train.evaluation.scoring import LogitsFn, ScoreRequest, rolling_windows, score_requests
from jtok_train.inference import SamplingParams, generate, load_for_inference
from jtok_train.inference.loading import check_tokenizer

__all__ = ["TokenScoringLM", "JTokLM", "EvalInputError"]


class EvalInputError(ValueError):
    """A bad evaluation argument; the message names the value and the fix."""


def _as_int(name: str, value: Any, minimum: int = 1) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise EvalInputError(f"{name}={value!r} is invalid: expected an integer >= {minimum}") from None
    if v < minimum:
        raise EvalInputError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")
    return v


class TokenScoringLM(TemplateLM):
    """lm-eval LM over ``tokenizer`` (jtok_train.data.tokenizer.Tokenizer) and ``logits_fn``.

    generate_fn(prompt_ids [b, s], max_new_tokens, temperature) -> [b, s + new] ids, stopping at end-of-document
    (None: generate_until is refused). max_length: the model's sequence length.
    """

    def __init__(self, tokenizer: Any, logits_fn: LogitsFn, max_length: int, batch_size: int = 8,
                 generate_fn: Optional[Callable[..., torch.Tensor]] = None, max_gen_toks: int = 256,
                 pad_multiple: int = 1):
        super().__init__()
        self.tok = tokenizer
        self.logits_fn = logits_fn
        self.max_length = int(max_length)
        self.batch_size = _as_int("batch_size", batch_size)
        self.generate_fn = generate_fn
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.pad_multiple = pad_multiple

    # -- what TemplateLM needs ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eod)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    @property
    def tokenizer_name(self) -> str:
        return f"jtok-bpe-{self.tok.sha256[:12]}"

    def _num_batches(self, needed: int) -> int:
        """Forwards to run for ``needed`` batches of work (the in-loop evaluator agrees on it over ranks)."""
        return needed

    def _score(self, requests: list[ScoreRequest]) -> list[tuple[float, bool]]:
        needed = -(-len(requests) // self.batch_size)
        return score_requests(self.logits_fn, requests, self.max_length, self.batch_size, self.eot_token_id,
                              num_batches=self._num_batches(needed), pad_multiple=self.pad_multiple)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # a context that is only whitespace encodes to nothing: condition on end-of-document, as for ""
        scored = [ScoreRequest(tuple(ctx) or (self.eot_token_id,), tuple(cont)) for _, ctx, cont in requests]
        out = self._score(scored)
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[ScoreRequest] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for w in rolling_windows(self.tok_encode(text), self.eot_token_id, self.max_length):
                windows.append(w)
                owner.append(i)
        scores = self._score(windows)
        total = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            total[i] += ll
        for req, ll in zip(requests, total):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.generate_fn is None:
            raise EvalInputError("this evaluator scores log-likelihoods only: run generation tasks with jtok-eval "
                                 "on a checkpoint")
        prepared = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs or {}), default_max_gen_toks=self.max_gen_toks)
            n = int(kw["max_gen_toks"])
            if n >= self.max_length:
                raise EvalInputError(f"max_gen_toks={n} leaves no room for a prompt in the model's sequence length "
                                     f"{self.max_length}: lower max_gen_toks")
            temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample") else 0.0
            ids = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - n):]
            prepared.append((ids, n, temperature, list(kw["until"])))
        # one batch = prompts of the same length and settings (the KV cache takes equal-length prompts)
        groups: dict[tuple[int, int, float], list[int]] = {}
        for i, (ids, n, temp, _) in enumerate(prepared):
            groups.setdefault((len(ids), n, temp), []).append(i)
        out: list[str] = [""] * len(prepared)
        with tqdm(total=len(prepared), disable=disable_tqdm, desc="generate_until") as bar:
            for (_, n, temp), idx in groups.items():
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start: start + self.batch_size]
                    prompt = torch.tensor([prepared[i][0] for i in chunk], dtype=torch.long)
                    tokens = self.generate_fn(prompt, n, temp)
                    for row, i in enumerate(chunk):
                        new = tokens[row, prompt.shape[1]:].tolist()
                        if self.eot_token_id in new:
                            new = new[: new.index(self.eot_token_id)]
                        text = self.tok_decode(new)
                        for stop in prepared[i][3]:
                            if stop:
                                text = text.split(stop)[0]
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return out


@register_model("jtok")
class JTokLM(TokenScoringLM):
    """A jtok-train checkpoint as an lm-eval model (``--model jtok --model_args checkpoint=PATH,...``).

    checkpoint: a run directory (its latest checkpoint) or a checkpoints/step_* directory. tables: host
    (default; only the current tokens' rows go to the device) or device. tokenizer: tokenizer.json (default:
    the checkpoint's data.tokenizer). batch_size: sequences per forward. device: cpu, cuda or None (the GPU if
    there is one). verify: check the checkpoint's checksums first.
    """

    def __init__(self, checkpoint: str = "", tables: str = "host", tokenizer: str = "", batch_size: Any = 8,
                 device: Optional[str] = None, max_gen_toks: Any = 256, verify: Any = True, seed: Any = 0,
                 max_batch_size: Any = None, **unknown: Any):
        if unknown:
            raise EvalInputError(f"unknown model argument(s) {', '.join(sorted(unknown))} for --model jtok: known "
                                 "are checkpoint, tables, tokenizer, batch_size, device, max_gen_toks, verify, seed")
        if not checkpoint:
            raise EvalInputError("checkpoint= is missing: pass --model_args checkpoint=RUN_DIR (or a "
                                 "checkpoints/step_* directory)")
        if tables not in ("host", "device"):
            raise EvalInputError(f"tables={tables} is invalid: use tables=host or tables=device")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = 8
        if device in ("auto", ""):
            device = None
        if device not in (None, "cpu", "cuda") and not str(device).startswith("cuda:"):
            raise EvalInputError(f"device={device} is invalid: use cpu, cuda or leave it out")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda:0 unless told otherwise: run where the model can
            warnings.warn(f"device={device} but no GPU is visible: evaluating on the CPU")
            device = "cpu"
        verify = str(verify).lower() not in ("false", "0", "no")
        loaded = load_for_inference(checkpoint, tables=tables, device=device, verify_checksums=verify)
        tok_path = tokenizer or str(loaded.cfg.data.tokenizer)
        if not os.path.isfile(tok_path):
            raise CheckpointError(f"tokenizer {tok_path} (the checkpoint's data.tokenizer) does not exist: pass "
                                  "tokenizer=PATH/tokenizer.json")
        tok = load_tokenizer(tok_path)
        try:
            check_tokenizer(tok, loaded.cfg, given=bool(tokenizer))
        except UsageError as e:
            raise EvalInputError(str(e)) from None
        self.loaded = loaded
        seq = int(loaded.cfg.model.seq_length)
        seed = int(seed)
        model, provider, dev = loaded.model, loaded.provider, loaded.device

        def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.to(dev)
            positions = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
            return model(tokens, positions, None).float()

        def generate_fn(prompt: torch.Tensor, max_new_tokens: int, temperature: float) -> torch.Tensor:
            out = generate(model, prompt, max_new_tokens, SamplingParams(temperature=temperature, seed=seed),
                           use_cache=True, eos_id=tok.eod, provider=provider, vocab_limit=tok.vocab_size,
                           max_sequence_length=seq)
            return out.tokens

        super().__init__(tok, logits_fn, seq, batch_size=batch_size, generate_fn=generate_fn,
                         max_gen_toks=max_gen_toks)
        self._device = dev

    def get_model_info(self) -> dict:
        m = self.loaded.meta
        return {"checkpoint": str(self.loaded.path), "step": m.get("step"), "model": self.loaded.cfg.model.name,
                "jtok": self.loaded.cfg.jtok.variant, "tables": self.loaded.tables}
