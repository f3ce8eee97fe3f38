"""Step metrics: throughput, MFU, a console progress bar, metrics.jsonl and (optionally) W&B.

Only the logging rank writes; every rank computes the same reduced numbers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["peak_flops_per_rank", "StepTimer", "MetricsLogger"]

# Dense bf16 tensor-core peaks (vendor datasheets) for MFU on GPUs.
_GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}
# Nominal CPU peak per core: 2 FMA units x 8 fp32 lanes (AVX2) x 2 flops x 2.5 GHz. A yardstick, not a
# measurement: CPU MFU figures are for comparing runs with each other.
CPU_PEAK_PER_CORE = 80e9


def peak_flops_per_rank(configured: float, threads: int) -> float:
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in _GPU_PEAKS.items():
            if key in name:
                return peak
        return 312e12
    return CPU_PEAK_PER_CORE * max(1, threads)


class StepTimer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


class MetricsLogger:
    """Progress bar + metrics.jsonl + W&B, on the logging rank only."""

    def __init__(self, cfg: Any, run_dir: Path, total_steps: int, start_step: int, is_logging_rank: bool):
        self.enabled = is_logging_rank
        self.cfg = cfg
        self.bar = None
        self.file = None
        self.wandb_run = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.logging.metrics_file:
            self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.train.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if cfg.logging.wandb:
            self.wandb_run = self._init_wandb(run_dir)

    def _init_wandb(self, run_dir: Path):
        import wandb
        from omegaconf import OmegaConf

        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            project=self.cfg.logging.wandb_project,
            dir=str(run_dir),
            mode=self.cfg.logging.wandb_mode,
            config=OmegaConf.to_container(self.cfg, resolve=True),
        )

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> None:
        """Record ``metrics`` for ``step``; ``advance`` moves the progress bar (train steps only)."""
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.bar is not None and advance:
            post = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
            if "mfu" in metrics:
                post["mfu"] = f"{100 * metrics['mfu']:.2f}%"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
