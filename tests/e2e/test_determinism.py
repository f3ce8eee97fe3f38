"""Two identical trainings in two processes end bitwise alike (the demo model with JTok-M: its reference blend
once used advanced indexing, whose backward on CPU adds gradients in a varying order, and two runs differed in
the last bits; resume-exactness and the overlap on/off check rely on this)."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_resume import _launch, _wait


def _final_tensors(run) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run.parent / f"{run.name}.pt"
    dcp_to_torch_save(str(run / "checkpoints" / "step_0000002"), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if torch.is_tensor(v)}


@pytest.mark.slow
def test_two_identical_runs_are_bitwise_equal(small_dataset, tmp_path):
    args = lambda run: ["model=tiny", "jtok=jtokm", f"data.prefixes=[{small_dataset['prefix']}]",   # noqa: E731
                        f"data.tokenizer={small_dataset['tokenizer']}", "model.vocab_size=512",
                        "train.micro_batch_size=4", "train.global_batch_size=16", "train.eval_samples=4",
                        "train.train_iters=2", "train.save=true", "train.progress=false", "logging.wandb=false",
                        f"train.run_dir={run}"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert _wait(_launch(1, args(run), run)) == [0]
    a, b = (_final_tensors(r) for r in runs)
    assert a.keys() == b.keys() and any("jtok" in k for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
