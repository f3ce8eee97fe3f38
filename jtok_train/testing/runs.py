"""What a finished run directory holds, for tests that compare runs launched as separate processes (torchrun,
SLURM jobs, killed and resumed runs): the losses it logged and every tensor of one of its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from jtok_train.testing.distributed import run_distributed

__all__ = ["logged_losses", "checkpoint_state", "assert_same_run", "train_run"]


def _fit(overrides: list[str]) -> None:
    # runs in a rank (where they are preloaded), not in the test process that imports this module
    # lazy: cost (hydra, 0.3-0.6 s)
    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer  # lazy: cost (torch + megatron.core, 5-8 s)

    build_trainer(compose(overrides)).fit()


def train_run(overrides: list[str], world_size: int = 1, timeout: float = 600) -> None:
    """Train (and save, as the overrides say) on run_distributed's preloaded ranks: for tests whose subject is
    what a run leaves behind (its checkpoint, its metrics), not the command line that starts it (the command
    line's own tests start it as users do: tests/e2e/test_cli.py, test_launch.py, test_resume.py)."""
    run_distributed(_fit, world_size, overrides, timeout=timeout, threads_per_rank=1)


def logged_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record in run/metrics.jsonl, in the order written (a step logged before a
    kill and again after the resume appears twice)."""
    f = Path(run) / "metrics.jsonl"
    if not f.is_file():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, f.read_text().splitlines()) if "loss" in r]


def checkpoint_state(run: Path, step: int) -> dict:
    """Every tensor of checkpoint ``step`` (model, optimizer, RNG: torch's DCP format read without a process
    group) plus its step and consumed samples."""
    import torch  # lazy: cost (torch, 2-5 s: logged_losses and train_run go without it)
    # lazy: cost (torch.distributed.checkpoint, 0.5-1.5 s)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = Path(run)
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    out = run.parent / f"{run.name}.step{step}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    meta = torch.load(ckpt / "common.pt", weights_only=True)["meta"]
    return {"tensors": {k: v for k, v in state.items() if torch.is_tensor(v)},
            "step": meta["step"], "consumed": meta["consumed_samples"]}


def assert_same_run(ref_run: Path, run: Path, steps: int) -> None:
    """``run`` ended bitwise where ``ref_run`` did: every tensor of the final checkpoints equal (table rows,
    backbone, optimizer moments), the same samples consumed, and every step's logged loss equal (also the
    steps a killed run logged before its resume)."""
    import torch  # lazy: cost (torch, 2-5 s: logged_losses and train_run go without it)

    a, b = checkpoint_state(ref_run, steps), checkpoint_state(run, steps)
    assert (a["step"], a["consumed"]) == (b["step"], b["consumed"])
    assert a["tensors"].keys() == b["tensors"].keys()
    assert any("token_table" in k for k in a["tensors"]) and any("exp_avg" in k for k in a["tensors"])
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    ref = dict(logged_losses(ref_run))
    got = logged_losses(run)
    assert {s for s, _ in got} == set(range(1, steps + 1)), sorted({s for s, _ in got})
    for s, loss in got:
        assert loss == ref[s], (s, loss, ref[s])
