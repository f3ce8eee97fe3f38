"""Decode speed with KV cache: the backbone alone vs the same backbone + JTok-M with its tables in host memory
(and with the tables resident on the device, for reference), side by side in one process.

    .venv/bin/python benchmarks/decode_bench.py                          # tiny + bench, batch 1 and 8
    .venv/bin/python benchmarks/decode_bench.py --configs tiny --repeats 3 --new-tokens 32

Models are randomly initialised (speed does not depend on the weights) and share their backbone weights; every
variant decodes the same fixed continuation with the KV cache (teacher forcing: the work of a decode step, but
the same tokens, so MoE routing and JTok lookups are comparable), the full number of new tokens. Every variant runs on the same prompt and lengths, one thread, in the order
A B C A B C ... (repeats). Headline figures ("best"): every decode step timed, each step at its fastest over
the repeats, summed: on a shared machine other processes only ever add time, so the minimum is the steadiest
estimate of the work. Also recorded: medians over repeats of the whole decode (wall and CPU time) and the
medians of the per-repeat ratios (the variants of one repeat run back to back). Also reported: the bytes of table
rows that cross to the device per decoded token (all L * n_e rows of the new token; see
jtok_train/tables/host.py). Results: a markdown table on stdout and benchmarks/results/decode.json.

From other code: ``measure_decode(overrides, ...)`` returns the same figures for any config.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "backbone": ["jtok=none"],
    "jtokm_host": ["jtok=jtokm"],       # tables in host memory, rows of the new token copied per step
    "jtokm_device": ["jtok=jtokm"],     # the whole table resident on the compute device
}
CONFIGS = {
    # the demo model: d 128, 4 layers, 8 experts top-2 + shared, vocab 4096
    "tiny": ["model=tiny"],
    # wider: d 256, 6 layers, 16 experts top-2, vocab 4096 (as benchmarks/exchange_bench.py)
    "bench": ["model=tiny", "model.hidden_size=256", "model.num_layers=6", "model.num_attention_heads=8",
              "model.num_experts=16", "model.moe_ffn_hidden_size=256", "model.moe_shared_expert_intermediate_size=256"],
    # the same width and depth, dense SwiGLU FFN 1024 (no expert dispatch)
    "bench_dense": ["model=tiny_dense", "model.hidden_size=256", "model.num_layers=6", "model.num_attention_heads=8",
                    "model.ffn_hidden_size=1024", "model.vocab_size=4096", "model.seq_length=256"],
}


def _build(overrides: Sequence[str], tables: str, device: Any) -> tuple[Any, Any, Any]:
    """(model, provider, cfg): a randomly initialised model, its JTok tables placed as asked."""
    from jtok_train.config import compose
    from jtok_train.inference import place_tables
    from jtok_train.model.builder import build_model, build_transformer_config

    cfg = compose(list(overrides))
    model = build_model(cfg, build_transformer_config(cfg))
    place_tables(model, tables, device)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, getattr(model, "token_table", None), cfg


def measure_decode(
    overrides: Sequence[str],
    variants: dict[str, list[str]] | None = None,
    prompt_len: int = 32,
    new_tokens: int = 64,
    batch: int = 1,
    repeats: int = 5,
    seed: int = 0,
    device: Any = None,
) -> dict:
    """Decode tokens/s (median over interleaved repeats) of each variant on ``overrides``' model.

    variants: name -> extra overrides; a name ending in ``_device`` keeps the JTok tables on the device,
    any other JTok variant keeps them in host memory. Returns {variant: {...}, "ratios": {...}} with the
    decode and prefill times, tokens/s, and the bytes of table rows per decoded token that crossed.
    """
    import torch

    from jtok_train.compat import device as compute_device
    from jtok_train.compat import init_distributed, init_model_parallel
    from jtok_train.inference import generate

    variants = dict(VARIANTS if variants is None else variants)
    init_distributed()
    init_model_parallel(seed=seed)
    dev = torch.device(device) if device is not None else compute_device()
    from jtok_train.compat.megatron import clear_aux_losses

    clear_aux_losses(reset=True)   # process-global, sized by the first model's layer count
    built = {name: _build([*overrides, *extra], "device" if name.endswith("_device") else "host", dev)
             for name, extra in variants.items()}
    # every variant gets the first one's backbone weights, so MoE routing (how many experts a step runs)
    # differs only by what JTok-M adds
    first = next(iter(built.values()))[0].state_dict()
    for model, _, _ in built.values():
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in first.items() if isinstance(v, torch.Tensor) and k in own
                               and own[k].shape == v.shape}, strict=False)
    vocab = min(cfg.model.vocab_size for _, _, cfg in built.values())
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    # the same continuation for every variant (teacher forcing: a decode step's work, a fixed token sequence)
    forced = torch.randint(0, vocab, (batch, new_tokens), generator=g)
    for model, provider, _ in built.values():      # warm-up: allocator, caches
        generate(model, prompt, new_tokens, provider=provider, forced_tokens=forced)
    runs: dict[str, list[Any]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (model, provider, _) in built.items():
            runs[name].append(generate(model, prompt, new_tokens, provider=provider, forced_tokens=forced,
                                          time_steps=True))
    def best_s(outs: list[Any]) -> float:
        """Decode time with each step at its fastest over the repeats: other processes only ever add time."""
        return sum(min(steps) for steps in zip(*(o.step_s for o in outs)))

    out: dict[str, Any] = {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch, "repeats": repeats}
    for name, outs in runs.items():
        _, provider, cfg = built[name]
        rec: dict[str, Any] = {
            "decode_tokens_per_s_best": outs[0].decode_steps * batch / best_s(outs),
            "decode_tokens_per_s": statistics.median(o.decode_tokens_per_s for o in outs),
            "decode_tokens_per_s_all": [round(o.decode_tokens_per_s, 2) for o in outs],
            "decode_ms_per_step": statistics.median(1e3 * o.decode_s / o.decode_steps for o in outs),
            # tokens per second of this process's CPU time: on a shared machine wall time also counts the time
            # other processes held the core
            "decode_tokens_per_cpu_s": statistics.median(o.decode_steps * batch / o.decode_cpu_s for o in outs),
            "prefill_s": statistics.median(o.prefill_s for o in outs),
            "tables": "none" if provider is None else ("device" if name.endswith("_device") else "host"),
        }
        if provider is not None and hasattr(provider, "row_bytes"):
            t = outs[-1].transfer
            prefill_bytes = prompt.t().reshape(-1).unique().numel() * provider.row_bytes if batch == 1 else None
            rec["table_bytes_per_decoded_token"] = provider.row_bytes   # L * n_e * d * element size
            rec["table_bytes_per_step_measured"] = (
                (t["bytes_to_device"] - prefill_bytes) / outs[-1].decode_steps if prefill_bytes is not None else
                None)
            rec["bytes_to_device_total"] = t["bytes_to_device"]
            rec["host_table_bytes"] = provider.host_bytes()
            rec["rows_per_token"] = f"L={provider.num_layers} x n_e={provider.num_sets} x d={provider.hidden_size}"
        out[name] = rec
    if "backbone" in runs:
        # per repeat (the variants of one repeat ran back to back), then the median: slow drifts cancel
        ratio = {"ratios_best": {f"{name}/backbone": best_s(runs["backbone"]) / best_s(runs[name])
                                 for name in variants if name != "backbone"}}
        for kind, key in (("ratios", "decode_s"), ("ratios_cpu", "decode_cpu_s")):
            ratio[kind] = {f"{name}/backbone": statistics.median(
                getattr(base_run, key) / getattr(run, key) for base_run, run in zip(runs["backbone"], runs[name]))
                for name in variants if name != "backbone"}
        out.update(ratio)
    del built
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    args = ap.parse_args()

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    results = []
    t0 = time.time()
    for config in args.configs:
        for batch in args.batches:
            r = measure_decode(CONFIGS[config], prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                               batch=batch, repeats=args.repeats)
            r["config"] = config
            results.append(r)
            print(f"{config} batch {batch}: " + ", ".join(
                f"{v} {r[v]['decode_tokens_per_s_best']:.1f} tok/s" for v in VARIANTS), flush=True)
    doc = {
        "command": "python benchmarks/decode_bench.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.time() - t0, 1),
        "configs": {k: v for k, v in CONFIGS.items() if k in args.configs},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print("| config | batch | backbone tok/s | + JTok-M, host tables | vs backbone | + JTok-M, device tables | "
          "vs backbone | (medians: host / device vs backbone) | table bytes per decoded token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        h, d = r["jtokm_host"], r["jtokm_device"]
        b, m = r["ratios_best"], r["ratios"]
        print(f"| {r['config']} | {r['batch']} | {r['backbone']['decode_tokens_per_s_best']:.1f} | "
              f"{h['decode_tokens_per_s_best']:.1f} | {b['jtokm_host/backbone'] - 1:+.1%} | "
              f"{d['decode_tokens_per_s_best']:.1f} | {b['jtokm_device/backbone'] - 1:+.1%} | "
              f"{m['jtokm_host/backbone'] - 1:+.1%} / {m['jtokm_device/backbone'] - 1:+.1%} | "
              f"{h['table_bytes_per_decoded_token']:,} ({h['rows_per_token']}, fp32) |")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
