"""Hot rows (parallel.hot_rows): the most frequent ids' rows replicated on every rank, the tail sharded. On real
gloo processes: the same training as without hot rows, replicas bitwise equal everywhere, checkpoints in the
layout without hot rows (so a run resumes with another H and another world size)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from jtok_train.testing import run_distributed
from jtok_train.testing.runs import checkpoint_state
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed

STEPS = 6


def _table_state(tr) -> dict[str, str]:
    """sha256 of the whole table and of its optimizer's moments and row steps, gathered in token order."""
    import torch.distributed as dist

    table, opt = tr.module.tables[0], tr.module.table_opts[0]

    def full(t):
        parts = [torch.empty_like(t) for _ in range(table.world)]
        dist.all_gather(parts, t.contiguous(), group=table.group)
        return torch.cat(parts)[: table.vocab_size][table.placement.position_of]

    return {name: hashlib.sha256(full(t).reshape(-1).contiguous().view(torch.uint8).numpy()).hexdigest()
            for name, t in (("table", table.shard), ("exp_avg", opt.exp_avg), ("exp_avg_sq", opt.exp_avg_sq),
                            ("row_steps", opt.steps))}


def _replicas(tr) -> dict:
    """Whether the replicas (values, moments, steps) are bitwise equal on every rank and equal to the owners' rows."""
    import torch.distributed as dist

    table, opt = tr.module.tables[0], tr.module.table_opts[0]
    if not table.num_hot:
        return {"num_hot": 0}
    mine = torch.cat([x.reshape(len(x), -1).double() for x in
                      (table.hot, opt.hot_exp_avg, opt.hot_exp_avg_sq, opt.hot_steps)], 1)
    every = [torch.empty_like(mine) for _ in range(table.world)]     # the ranks of this pipeline stage
    dist.all_gather(every, mine, group=table.group)
    ids = torch.from_numpy(table.hot_ids)

    def full(t):
        parts = [torch.empty_like(t) for _ in range(table.world)]
        dist.all_gather(parts, t.contiguous(), group=table.group)
        return torch.cat(parts)[: table.vocab_size][table.placement.position_of][ids]

    owners = all(torch.equal(full(s), h) for s, h in ((table.shard, table.hot), (opt.exp_avg, opt.hot_exp_avg),
                                                      (opt.exp_avg_sq, opt.hot_exp_avg_sq), (opt.steps, opt.hot_steps)))
    return {"num_hot": table.num_hot, "hot_ids": table.hot_ids.copy(), "owners_equal_replicas": owners,
            "replicas_bitwise_equal": all(torch.equal(every[0], x) for x in every)}


def _train(runs: list[tuple[list[str], int | None]]) -> list[dict]:
    """Each run: (overrides, stop_at): train to ``stop_at`` of a ``train.train_iters``-step run and save there
    (None: to the end). A run directory with a checkpoint resumes from it."""
    from jtok_train.config import compose
    from jtok_train.training.trainer import build_trainer

    out = []
    for overrides, stop_at in runs:
        tr = build_trainer(compose(overrides))
        rec = {"start_step": tr.start_step}
        if tr.start_step:
            rec["loaded"], rec["loaded_replicas"] = _table_state(tr), _replicas(tr)
        if stop_at is not None:
            tr.cfg.train.train_iters = stop_at
        res = tr.fit()
        rec.update(losses=res.losses, metrics=res.final_metrics, saved=_table_state(tr), **_replicas(tr))
        out.append(rec)
    return out


def _inference_table(run: str) -> np.ndarray:
    """The JTok table jtok-generate's loader builds from a run's checkpoint (world size 1, token order)."""
    from jtok_train.inference import load_for_inference

    return load_for_inference(run, tables="device").provider.weight.detach().float().numpy().copy()


def _cfg(data, tmp, name, **kw):
    return tiny_overrides(data, str(tmp / name), **{"parallel.embedding": "sharded", "train.train_iters": STEPS,
                                                    "train.save": "true", "train.warmup_fraction": 0.2, **kw})


LR = 1e-3   # tiny_overrides' train.lr


def _assert_close_states(a: dict, b: dict, what: str) -> None:
    """Every weight within 1e-6 (moments: below), but for at most 1 in 10,000 entries, which must stay within a
    tenth of one learning-rate step. Why: the two runs add the same row gradients in another order (an all-reduce over the
    ranks instead of the owner's per-micro-batch sums), a few ulps apart. Where an entry's gradient is a sum that
    cancels to ~1e-9, those ulps are a large relative change, and Adam, which divides by the gradient's own
    scale, turns it into a visible share of a step (seen: 2 of 327,680 table entries, 6.7e-6 after 6 steps). A
    lost, doubled or misrouted row gradient instead moves all of that row's entries by about one step (1e-3)
    per step, far outside both bounds."""
    assert a.keys() == b.keys(), what
    assert any("token_table" in k for k in a) and any("exp_avg" in k for k in a)
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), f"{what}: {k}"
            continue
        diff = (a[k].double() - b[k].double()).abs()
        # weights: 1e-6 absolute, a tenth of a step at most. Adam's moments hold the gradients themselves, whose
        # noise-level entries (experts few tokens reached) differ in relative terms by much more: 1e-4 of the
        # tensor's largest entry, a tenth of it at most (a lost row gradient changes a moment by ~(1 - beta)
        # of that gradient, a few percent of the largest entry)
        moment = "exp_avg" in k
        unit = max(float(a[k].abs().max()), 1e-30) if moment else 1.0
        near, bound = (1e-4 * unit, 0.1 * unit) if moment else (1e-6, 0.1 * LR)
        far = int((diff > near).sum())
        assert far <= max(1, diff.numel() // 10_000), f"{what}: {k}: {far} of {diff.numel()} entries differ by > {near:.3g}"
        assert float(diff.max()) <= bound, f"{what}: {k}: max difference {float(diff.max()):.3g} > {bound:.3g}"


@pytest.mark.slow
def test_hot_rows_train_like_the_sharded_table_on_2_and_4_ranks(small_dataset, tmp_path):
    """6 steps with H = 64 of 512 ids against the same run without hot rows: every tensor of the final
    checkpoints (backbone, table, Adam moments of both) within 1e-6. fp32 and the same data: hot rows change only
    the order of the table's gradient sums (an all-reduce over the ranks instead of the owner's per-micro-batch
    sums), a few ulps per step, while a lost or doubled gradient moves a row by ~lr = 1e-3 per step."""
    from jtok_train.data.counts import counts_path

    counts = np.load(counts_path(small_dataset["prefix"]))
    counts = np.pad(counts, (0, 512 - len(counts)))     # ids the data never holds count 0
    ranked = np.argsort(-counts, kind="stable")
    sparse = {"jtok.table_optimizer": "sparse_adamw"}
    jtok = {"jtok": "jtok", "jtok.scale_init": 0.5}
    cases = {   # name: (ranks, overrides of both runs, H); H = 512: every row replicated, nothing exchanged
        "m2": (2, {}, 64), "j2": (2, jtok, 64), "m2_sparse": (2, sparse, 64), "j2_sparse": (2, {**jtok, **sparse}, 64),
        "m2_nodedup": (2, {"parallel.dedup": "false"}, 64), "m2_all": (2, {}, 512), "m4": (4, {}, 64),
        "j4": (4, jtok, 64), "m4_sparse": (4, sparse, 64),
        # what users run: bf16, the distributed optimizer, EP 2, full recompute; and 2 pipeline stages x 2 ranks
        "prod2": (2, {"train.precision": "bf16", "parallel.use_distributed_optimizer": "true",
                      "parallel.expert_model_parallel_size": 2, "model.recompute_granularity": "full",
                      "model.recompute_method": "uniform", "model.recompute_num_layers": 1}, 64),
        "pp4": (4, {"parallel.pipeline_model_parallel_size": 2}, 64),
    }
    results = {}
    for ranks in (2, 4):
        names = [n for n, (r, _, _) in cases.items() if r == ranks]
        runs = []
        for n in names:
            extra = dict(cases[n][1])
            kw = {"jtok": extra.pop("jtok")} if "jtok" in extra else {}
            runs += [(_cfg(small_dataset, tmp_path, f"{n}_ref", **kw, **extra), None),
                     (_cfg(small_dataset, tmp_path, f"{n}_hot", **kw, **extra, **{"parallel.hot_rows": cases[n][2]}),
                      None)]
        got = run_distributed(_train, ranks, runs, timeout=1200)
        for i, n in enumerate(names):
            results[n] = [rank[2 * i : 2 * i + 2] for rank in got]
    for n, per_rank in results.items():
        H = cases[n][2]
        for ref, hot in per_rank:
            assert ref["num_hot"] == 0 and hot["num_hot"] == H, n
            assert hot["replicas_bitwise_equal"], f"{n}: the replicas differ between ranks"
            assert hot["owners_equal_replicas"], f"{n}: an owner's shard row or moment differs from the replica"
            assert np.array_equal(hot["hot_ids"], np.sort(ranked[:H])), n
            assert hot["losses"] == pytest.approx(ref["losses"], rel=1e-6), n
            m_ref, m_hot = ref["metrics"], hot["metrics"]
            assert m_ref["exchange/hot_hits"] == 0 and m_hot["exchange/hot_hits"] > 0, n
            # H rows of the stage's layers (2, or 1 of 2 stages) x d 64 x (n_e 5 for JTok-M, 1 for JTok), fp32
            layers = 1 if n == "pp4" else 2
            assert m_hot["exchange/hot_reduce_bytes"] == H * layers * (1 if n.startswith("j") else 5) * 64 * 4, n
            # the same ids looked up; the hot ones no longer travel
            assert m_hot["exchange/unique_ids"] == m_ref["exchange/unique_ids"], n
            assert m_hot["exchange/rows_requested"] == m_ref["exchange/rows_requested"] - m_hot["exchange/hot_hits"], n
            assert m_hot["exchange/bytes_sent"] < m_ref["exchange/bytes_sent"], n
            if H == 512:    # nothing travels but the counts
                assert m_hot["exchange/rows_requested"] == 0 and m_hot["exchange/hot_hits"] == m_hot["exchange/unique_ids"]
        _assert_close_states(checkpoint_state(tmp_path / f"{n}_ref", STEPS)["tensors"],
                             checkpoint_state(tmp_path / f"{n}_hot", STEPS)["tensors"], n)
    # jtok-generate reads a hot-row run's checkpoint like any other: its table is the checkpoint's, in token order
    from jtok_train.config import compose
    from jtok_train.tables.placement import RowPlacement

    seed = compose(_cfg(small_dataset, tmp_path, "m2_hot")).jtok.table_seed
    permuted = checkpoint_state(tmp_path / "m2_hot", STEPS)["tensors"]["module.token_table.shard"]
    loaded = run_distributed(_inference_table, 1, str(tmp_path / "m2_hot"), timeout=300)[0]
    assert np.array_equal(loaded, permuted[RowPlacement(512, 1, seed).position_of].numpy())
    # the 64 most frequent of 512 ids serve a large share of each micro-batch's unique ids locally
    m = results["m2"][0][1]["metrics"]
    assert m["exchange/hot_hits"] > 0.2 * m["exchange/unique_ids"], m


@pytest.mark.slow
def test_resume_with_another_hot_row_count_and_world_size(small_dataset, tmp_path):
    """Saved at step 3 of 6 on 2 ranks with H = 64; resumed (a) on 4 ranks with H = 16 and (b) on 2 ranks without
    hot rows: the table and its moments load bitwise as saved, the replicas are filled from their owners, and
    (b) ends within 1e-6 of the uninterrupted run without hot rows (the tolerance of the test above). (a) runs
    its last steps on 4 ranks, whose other reduction order is checked by the losses (rel 1e-5, as
    test_checkpoint.py's world-size resumes)."""
    hot64 = {"parallel.hot_rows": 64}
    ref = run_distributed(_train, 2, [(_cfg(small_dataset, tmp_path, "ref"), None)], timeout=900)[0][0]
    for name in ("a", "b"):
        saved = run_distributed(_train, 2, [(_cfg(small_dataset, tmp_path, name, **hot64), STEPS // 2)],
                                timeout=900)[0][0]
        assert (tmp_path / name / "checkpoints" / f"step_{STEPS // 2:07d}").is_dir()
        if name == "a":
            got = run_distributed(_train, 4, [(_cfg(small_dataset, tmp_path, name, **{"parallel.hot_rows": 16}),
                                               None)], timeout=900)
        else:
            got = run_distributed(_train, 2, [(_cfg(small_dataset, tmp_path, name), None)], timeout=900)
        for rank in got:
            r = rank[0]
            assert r["start_step"] == STEPS // 2 and r["loaded"] == saved["saved"], name
            lr = r["loaded_replicas"]
            assert lr["num_hot"] == (16 if name == "a" else 0), name
            if lr["num_hot"]:
                assert lr["owners_equal_replicas"] and lr["replicas_bitwise_equal"], name
            assert r["losses"] == pytest.approx(ref["losses"][STEPS // 2:], rel=1e-5), name
    _assert_close_states(checkpoint_state(tmp_path / "ref", STEPS)["tensors"],
                         checkpoint_state(tmp_path / "b", STEPS)["tensors"], "H=64 on 2 ranks -> no hot rows")
