"""The sharded tables' optimizer against torch.optim.AdamW (dense) and a per-row reference (sparse)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from jtok_train.tables.optimizer import ShardedTableOptimizer, fused_adamw_available


def _table(rows=37, shape=(2, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    shard = torch.randn(rows, *shape, generator=g)
    t = SimpleNamespace(shard=shard, shard_grad=torch.zeros_like(shard),
                        touched=torch.zeros(rows, dtype=torch.bool), start_row=0, stop_row=rows, num_hot=0)
    t.touched_rows = lambda: torch.nonzero(t.touched, as_tuple=False).flatten()
    return t


@pytest.mark.parametrize("fused", [False, True])
def test_dense_adamw_equals_torch_adamw(fused):
    """torch's own AdamW on the shard (the tables are fp32 in every precision): its single-tensor implementation is
    bitwise torch.optim.AdamW's default; the fused kernel (one pass, no rounding between its element-wise steps)
    rounds differently: within 1e-7 relative (norm of the difference; measured 3.5e-9 after 5 steps) and within
    4 ulps of the largest entry everywhere (entries whose update is most of their value differ most)."""
    dtype = torch.float32
    if fused:
        assert fused_adamw_available(torch.device("cpu")), "this torch has no fused AdamW for CPU tensors"
    t = _table()
    t.shard, t.shard_grad = t.shard.to(dtype), t.shard_grad.to(dtype)
    ref = torch.nn.Parameter(t.shard.clone())
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    opt = ShardedTableOptimizer(t, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, kind="adamw", fused=fused)
    assert opt.fused == fused
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grad = torch.randn(t.shard.shape, generator=g).to(dtype)
        t.shard_grad.copy_(grad)
        ref.grad = grad.clone()
        lr = 1e-2 * (1 - 0.1 * step)
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()
        opt.step(lr=lr)
        if not fused:
            assert torch.equal(t.shard, ref.detach()), f"step {step}"
        else:
            a, b = t.shard.double(), ref.detach().double()
            assert float((a - b).abs().max()) <= 4 * torch.finfo(dtype).eps * float(b.abs().max()), f"step {step}"
            assert float((a - b).norm() / b.norm()) <= 1e-7, f"step {step}"
        # the moments are torch's state, held by this object (the checkpoint reads them)
        state = torch_opt.state[ref]
        torch.testing.assert_close(opt.exp_avg, state["exp_avg"], rtol=0, atol=2 * float(torch.finfo(dtype).eps))
    assert opt.num_steps == 5 and t.shard.grad is None


def _touched_rows_ops() -> dict:
    import torch.distributed as dist

    from jtok_train.tables.sharded import ShardedTokenTable

    out = {}
    for name, rows in (("few", [0, 5, 6, 40]), ("many", list(range(0, 97, 2)))):   # 4 and 49 of 97 rows
        table = ShardedTokenTable(97, 2, 3, 8, group=dist.group.WORLD, seed=3)
        table.mark_touched(rows)
        out[name + "_row_ops"] = table._row_ops() is not None
        g = torch.Generator().manual_seed(4)
        table.shard_grad[rows] = torch.randn(len(rows), 2, 3, 8, generator=g)
        full = table.shard_grad.clone()
        out[name] = {"norm_sq": table.grad_norm_sq(), "want_norm_sq": float(full.double().square().sum())}
        table.scale_grad(0.25)
        out[name]["scaled"] = bool(torch.equal(table.shard_grad, full * 0.25))
        table.zero_grad()
        out[name]["zeroed"] = int(torch.count_nonzero(table.shard_grad)) == 0 and not bool(table.touched.any())
    return out


def test_touched_rows_only_zero_scale_and_norm():
    """The shard's gradient is nonzero on the step's touched rows only: zeroing, clipping and the norm read only
    those rows when they are few (at most 1/8 of the shard), the whole shard otherwise; both give what the
    whole-shard operations give."""
    from jtok_train.testing import run_distributed

    (out,) = run_distributed(_touched_rows_ops, 1, timeout=300)
    assert out["few_row_ops"] is True and out["many_row_ops"] is False
    for name in ("few", "many"):
        assert out[name]["norm_sq"] == pytest.approx(out[name]["want_norm_sq"], rel=1e-6), name
        assert out[name]["scaled"] and out[name]["zeroed"], name


def test_sparse_adamw_updates_only_touched_rows_with_per_row_steps():
    t = _table(rows=11, shape=(4,))
    opt = ShardedTableOptimizer(t, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, kind="sparse_adamw")
    start = t.shard.clone()
    g = torch.Generator().manual_seed(2)
    touched_per_step = [[1, 4], [4, 7], [1]]
    refs = {r: (start[r].clone(), torch.zeros(4), torch.zeros(4), 0) for r in range(11)}
    for rows in touched_per_step:
        t.touched.zero_()
        t.shard_grad.zero_()
        grad = torch.randn(11, 4, generator=g)
        t.shard_grad[rows] = grad[rows]
        t.touched[rows] = True
        opt.step(lr=0.05)
        for r in rows:  # lazy AdamW by hand, row by row
            p, m, v, k = refs[r]
            k += 1
            p = p * (1 - 0.05 * 0.1)
            m = 0.9 * m + 0.1 * grad[r]
            v = 0.95 * v + 0.05 * grad[r] ** 2
            p = p - 0.05 * (m / (1 - 0.9 ** k)) / ((v / (1 - 0.95 ** k)).sqrt() + 1e-8)
            refs[r] = (p, m, v, k)
    for r in range(11):
        torch.testing.assert_close(t.shard[r], refs[r][0], rtol=1e-6, atol=1e-7)
    untouched = [r for r in range(11) if r not in (1, 4, 7)]
    assert torch.equal(t.shard[untouched], start[untouched])
    assert opt.steps.tolist() == [0, 2, 0, 0, 2, 0, 0, 1, 0, 0, 0]
