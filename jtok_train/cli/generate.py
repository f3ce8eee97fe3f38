"""jtok-generate: continue a prompt with a trained checkpoint (KV cache; JTok tables in host memory).

    jtok-generate checkpoint=runs/demo prompt="The for statement"
    jtok-generate checkpoint=runs/demo/checkpoints/step_0000200 prompt="..." max_new_tokens=64 \\
        temperature=0.8 top_k=50 top_p=0.95 seed=1 tables=host

Keys (key=value):
  checkpoint      a run directory (its latest checkpoint) or a checkpoints/step_* directory   (required)
  prompt          the text to continue                                                       (required)
  max_new_tokens  tokens to generate (default 64)
  temperature     0 = greedy (default); > 0 samples
  top_k           sample among the k most likely tokens (0 = off, default)
  top_p           nucleus sampling: the smallest set with probability >= top_p (1.0 = off, default)
  seed            seed of the sampler (default 0)
  tables          host (default: JTok tables stay in host memory, only the current tokens' rows are copied
                  to the device) or device (the whole table on the device)
  cache           true (default: Megatron's KV cache) or false (recompute the sequence every step)
  stop_at_eod     true (default): stop at the tokenizer's end-of-document token
  tokenizer       tokenizer.json to use (default: the one the checkpoint was trained with, data.tokenizer)
  device          auto (default: the GPU if there is one) or cpu
  verify          true (default): check the checkpoint's files against its checksums first
  stats           true: print prefill/decode speed and the bytes per token that crossed to the device
                  (on stderr)

The text (prompt + continuation) goes to stdout. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from jtok_train.data.tokenizer import load_tokenizer
from jtok_train.errors import CheckpointError, RunError, UsageError

__all__ = ["GenerateArgs", "parse_args", "main"]


@dataclass
class GenerateArgs:
    checkpoint: str = ""
    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    tables: str = "host"
    cache: bool = True
    stop_at_eod: bool = True
    tokenizer: str = ""
    device: str = "auto"
    verify: bool = True
    stats: bool = False


_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(key: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.lower() not in _BOOL:
            raise UsageError(f"{key}={raw} is invalid: use {key}=true or {key}=false")
        return _BOOL[raw.lower()]
    try:
        return kind(raw)
    except ValueError:
        raise UsageError(f"{key}={raw} is invalid: expected {'an integer' if kind is int else 'a number'}") from None


def parse_args(argv: list[str]) -> GenerateArgs:
    """key=value arguments -> GenerateArgs (raises UsageError naming the key and the fix)."""
    args = GenerateArgs()
    fields = GenerateArgs.__dataclass_fields__
    kinds = {"max_new_tokens": int, "top_k": int, "seed": int, "temperature": float, "top_p": float,
             "cache": bool, "stop_at_eod": bool, "verify": bool, "stats": bool}
    for a in argv:
        if "=" not in a:
            raise UsageError(f"argument {a!r} is not key=value: write e.g. checkpoint=runs/demo prompt=\"Hello\"")
        key, raw = a.split("=", 1)
        key = key.lstrip("-").replace("-", "_")
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {near[0]}?)" if near else f"; known keys: {', '.join(fields)}"
            raise UsageError(f"unknown key {key!r}{hint}")
        setattr(args, key, _convert(key, raw, kinds[key]) if key in kinds else raw)
    if not args.checkpoint:
        raise UsageError("checkpoint= is missing: pass a run directory or a checkpoints/step_* directory")
    if not args.prompt.strip():
        raise UsageError("prompt is empty: pass prompt=\"some text\" to continue")
    if args.max_new_tokens < 1:
        raise UsageError(f"max_new_tokens={args.max_new_tokens} is invalid: use a positive number")
    if args.tables not in ("host", "device"):
        raise UsageError(f"tables={args.tables} is invalid: use tables=host or tables=device")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device={args.device} is invalid: use device=auto, cpu or cuda")
    # lazy: cost (torch via jtok_train.inference, 2-5 s: --help and bad keys answer without it)
    from jtok_train.inference.generation import SamplingParams

    try:
        SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return args


def run(args: GenerateArgs) -> str:
    """Load, generate, return the text (prompt + continuation); speed figures go to stderr with stats=true."""
    import torch  # lazy: cost (torch, 2-5 s: --help and bad keys answer without it)

    from jtok_train.inference import SamplingParams, generate, load_for_inference  # lazy: cost (torch, as above)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no GPU is visible: use device=auto or device=cpu")
    device = "cpu" if args.device == "cpu" else None
    lm = load_for_inference(args.checkpoint, tables=args.tables, device=device, verify_checksums=args.verify)
    tok_path = args.tokenizer or str(lm.cfg.data.tokenizer)
    if not os.path.isfile(tok_path):
        raise CheckpointError(f"tokenizer {tok_path} (the checkpoint's data.tokenizer) does not exist: pass "
                              "tokenizer=PATH/tokenizer.json")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > lm.cfg.model.vocab_size:
        raise UsageError(f"tokenizer {tok_path} has {tokenizer.vocab_size} ids, more than the model's "
                         f"model.vocab_size={lm.cfg.model.vocab_size}: pass the tokenizer the model was trained with")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UsageError("prompt encodes to no tokens: pass some text")
    out = generate(
        lm.model,
        torch.tensor([ids], dtype=torch.long),
        args.max_new_tokens,
        SamplingParams(args.temperature, args.top_k, args.top_p, args.seed),
        use_cache=args.cache,
        eos_id=tokenizer.eod if args.stop_at_eod else None,
        provider=lm.provider,
        vocab_limit=tokenizer.vocab_size,
        max_sequence_length=int(lm.cfg.model.seq_length),
    )
    new = out.tokens[0, len(ids):].tolist()
    if args.stop_at_eod and tokenizer.eod in new:
        new = new[: new.index(tokenizer.eod)]
    text = args.prompt + tokenizer.decode(new)
    if args.stats:
        t = out.transfer
        moved = (f", {t['bytes_to_device'] / max(1, t['positions']):,.0f} bytes of table rows per token to the "
                 f"device ({lm.tables} tables)") if t else ""
        print(f"jtok-generate: {lm.path} ({lm.cfg.model.name}, jtok={lm.cfg.jtok.variant}, step "
              f"{lm.meta['step']}): prompt {len(ids)} tokens in {out.prefill_s:.3f}s, {out.num_new} new tokens, "
              f"decode {out.decode_tokens_per_s:,.1f} tokens/s{moved}", file=sys.stderr)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    if os.environ.get("JTOK_VERBOSE", "0") != "1":
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
    from jtok_train.config import ConfigError  # lazy: cost (hydra + omegaconf via jtok_train.config, 0.3-0.6 s)

    try:
        args = parse_args(argv)
        text = run(args)
    except (UsageError, ConfigError) as e:
        print(f"jtok-generate: {e}", file=sys.stderr)
        return 2
    except RunError as e:   # a missing, incomplete, corrupted or foreign checkpoint
        print(f"jtok-generate: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. the prompt + max_new_tokens longer than the model's sequence length
        print(f"jtok-generate: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
