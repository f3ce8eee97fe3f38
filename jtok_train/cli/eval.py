"""jtok-eval: lm-evaluation-harness tasks on a trained checkpoint.

    jtok-eval checkpoint=runs/demo tasks=demo_cloze
    jtok-eval checkpoint=runs/demo/checkpoints/step_0000150 tasks=demo_cloze,arc_easy num_fewshot=0 limit=100 \\
        batch_size=16 tables=host

Keys (key=value):
  checkpoint   a run directory (its latest checkpoint) or a checkpoints/step_* directory        (required)
  tasks        comma-separated lm-eval task names (demo_cloze ships with jtok-train; the standard ones,
               e.g. arc_easy, arc_challenge, mmlu, ceval-valid, gsm8k, download their data)   (required)
  num_fewshot  few-shot examples per prompt (default: each task's own)
  limit        documents per task (an integer, or a fraction < 1 of each task)
  batch_size   sequences per forward (default 8)
  tables       host (default: the JTok tables stay in host memory) or device
  device       auto (default: the GPU if there is one) or cpu
  tokenizer    tokenizer.json (default: the one the checkpoint was trained with)
  max_gen_toks tokens generate_until may add (default 256, or the task's own)
  out          where the results JSON goes (default: <run_dir>/eval/<step_N>/<tasks>.json)
  include_path more lm-eval task directories (YAML), comma-separated
  seed         seed of lm-eval's few-shot sampling and of sampled generation (default 0)
  verify       true (default): check the checkpoint's files against its checksums first

Prints lm-eval's results table and writes the results as JSON. Bad input prints one line and exits with
code 2.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from jtok_train.errors import RunError, UsageError

__all__ = ["EvalArgs", "parse_args", "run", "main", "resolve_tasks"]


def resolve_tasks(names: list[str], include_path: str = "") -> Any:
    """``jtok_train.evaluation.harness.resolve_tasks``, a bad name or path as a usage error."""
    # lazy: cost (torch + lm_eval via jtok_train.evaluation, 3-8 s: --help and bad keys answer without them)
    from jtok_train.evaluation.harness import TaskError
    from jtok_train.evaluation.harness import resolve_tasks as _resolve_tasks  # lazy: cost (as above)

    try:
        return _resolve_tasks(names, include_path)
    except TaskError as e:
        raise UsageError(str(e)) from None


@dataclass
class EvalArgs:
    checkpoint: str = ""
    tasks: str = ""
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    batch_size: int = 8
    tables: str = "host"
    device: str = "auto"
    tokenizer: str = ""
    max_gen_toks: int = 256
    out: str = ""
    include_path: str = ""
    seed: int = 0
    verify: bool = True

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_INTS = ("num_fewshot", "batch_size", "max_gen_toks", "seed")


def parse_args(argv: list[str]) -> EvalArgs:
    """key=value arguments -> EvalArgs (raises UsageError naming the key and the fix)."""
    args = EvalArgs()
    fields = EvalArgs.__dataclass_fields__
    for a in argv:
        if "=" not in a:
            raise UsageError(f"argument {a!r} is not key=value: write e.g. checkpoint=runs/demo tasks=demo_cloze")
        key, raw = a.split("=", 1)
        key = key.lstrip("-").replace("-", "_")
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {near[0]}?)" if near else f"; known keys: {', '.join(fields)}"
            raise UsageError(f"unknown key {key!r}{hint}")
        if key in _INTS:
            try:
                value: Any = int(raw)
            except ValueError:
                raise UsageError(f"{key}={raw} is invalid: expected an integer") from None
        elif key == "limit":
            try:
                value = float(raw)
            except ValueError:
                raise UsageError(f"limit={raw} is invalid: expected a number of documents or a fraction") from None
            if value <= 0:
                raise UsageError(f"limit={raw} is invalid: use a positive count, or a fraction in (0, 1)")
            value = int(value) if value >= 1 else value
        elif key == "verify":
            if raw.lower() not in _BOOL:
                raise UsageError(f"verify={raw} is invalid: use verify=true or verify=false")
            value = _BOOL[raw.lower()]
        else:
            value = raw
        setattr(args, key, value)
    if not args.checkpoint:
        raise UsageError("checkpoint= is missing: pass a run directory or a checkpoints/step_* directory")
    if not args.task_list:
        raise UsageError("tasks= is missing: pass e.g. tasks=demo_cloze (comma-separated lm-eval task names)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"num_fewshot={args.num_fewshot} is invalid: use 0 or more")
    if args.batch_size < 1:
        raise UsageError(f"batch_size={args.batch_size} is invalid: use a positive number")
    if args.max_gen_toks < 1:
        raise UsageError(f"max_gen_toks={args.max_gen_toks} is invalid: use a positive number")
    if args.tables not in ("host", "device"):
        raise UsageError(f"tables={args.tables} is invalid: use tables=host or tables=device")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device={args.device} is invalid: use device=auto, cpu or cuda")
    return args


def default_out(checkpoint: Path, tasks: list[str], num_fewshot: Optional[int], limit: Any) -> Path:
    name = "_".join(tasks)
    if num_fewshot is not None:
        name += f"_{num_fewshot}shot"
    if limit is not None:
        name += f"_limit{limit}"
    # beside the checkpoint, not inside it (a checkpoint directory holds only its checksummed files)
    base = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return base / "eval" / checkpoint.name / f"{name}.json"


def run(args: EvalArgs) -> tuple[dict, Path]:
    """Evaluate; returns (lm-eval's results dict, the JSON path written)."""
    import lm_eval  # lazy: cost (torch + lm_eval, 3-8 s: --help and bad keys answer without them)
    from lm_eval.utils import handle_non_serializable  # lazy: cost (as above)

    from jtok_train.evaluation import JTokLM  # lazy: cost (as above)

    tm = resolve_tasks(args.task_list, args.include_path)   # before loading anything heavy
    lm = JTokLM(checkpoint=args.checkpoint, tables=args.tables, tokenizer=args.tokenizer,
                batch_size=args.batch_size, device=None if args.device == "auto" else args.device,
                max_gen_toks=args.max_gen_toks, verify=args.verify, seed=args.seed)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=args.task_list, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=tm,
        log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    results["jtok"] = lm.get_model_info()
    out = Path(args.out) if args.out else default_out(lm.loaded.path, args.task_list, args.num_fewshot, args.limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    os.replace(tmp, out)
    return results, out


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
        from jtok_train.evaluation import EvalInputError  # lazy: cost (torch + lm_eval, 3-8 s: not for bad keys)

        results, out = run(args)
    except (UsageError, ConfigError, RunError) as e:
        print(f"jtok-eval: {e}", file=sys.stderr)
        return 2
    except EvalInputError as e:
        print(f"jtok-eval: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table  # lazy: cost (torch + lm_eval, 3-8 s: not for --help, bad keys)

    print(make_table(results))
    print(f"results: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
