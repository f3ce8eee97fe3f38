"""jtok-export: a checkpoint as a Hugging Face directory (safetensors + config.json + tokenizer + modeling file).

    jtok-export checkpoint=runs/demo out=hf/demo
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/demo', trust_remote_code=True)"

Keys (key=value):
  checkpoint  a run directory (its latest checkpoint) or a checkpoints/step_* directory   (required)
  out         the directory to write (must be new or empty unless overwrite=true)       (required)
  tokenizer   tokenizer.json (default: the one the checkpoint was trained with)
  overwrite   true: write into a non-empty out
  verify      true (default): check the checkpoint's files against its checksums first

Layout of the weights: jtok_train/export/modeling_jtok.py (the JTok tables: one tensor model.token_table
[V, L, n_e, d]). Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings

from jtok_train.errors import RunError, UsageError

__all__ = ["main"]

_KEYS = ("checkpoint", "out", "tokenizer", "overwrite", "verify")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_args(argv: list[str]) -> dict:
    args: dict = {"checkpoint": "", "out": "", "tokenizer": "", "overwrite": False, "verify": True}
    for a in argv:
        if "=" not in a:
            raise UsageError(f"argument {a!r} is not key=value: write e.g. checkpoint=runs/demo out=hf/demo")
        key, raw = a.split("=", 1)
        key = key.lstrip("-").replace("-", "_")
        if key not in _KEYS:
            near = difflib.get_close_matches(key, _KEYS, n=1)
            raise UsageError(f"unknown key {key!r}" + (f" (did you mean {near[0]}?)" if near else
                                                       f"; known keys: {', '.join(_KEYS)}"))
        if key in ("overwrite", "verify"):
            if raw.lower() not in _BOOL:
                raise UsageError(f"{key}={raw} is invalid: use {key}=true or {key}=false")
            args[key] = _BOOL[raw.lower()]
        else:
            args[key] = raw
    if not args["checkpoint"]:
        raise UsageError("checkpoint= is missing: pass a run directory or a checkpoints/step_* directory")
    if not args["out"]:
        raise UsageError("out= is missing: pass the directory to write the Hugging Face model to")
    return args


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
        # lazy: cost (torch, megatron.core, transformers: 3-6 s; --help and bad keys answer without them)
        from jtok_train.export import ExportError, export_checkpoint

        try:
            out = export_checkpoint(args["checkpoint"], args["out"], args["tokenizer"], verify=args["verify"],
                                    overwrite=args["overwrite"])
        except ExportError as e:
            raise UsageError(str(e)) from None
    except (UsageError, ConfigError, RunError) as e:
        print(f"jtok-export: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out} (AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True))", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
