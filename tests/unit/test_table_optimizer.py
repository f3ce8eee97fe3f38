"""The sharded tables' optimizer against torch.optim.AdamW (dense) and a per-row reference (sparse)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from jtok_train.parallel.table_optimizer import ShardedTableOptimizer


def _table(rows=37, shape=(2, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    shard = torch.randn(rows, *shape, generator=g)
    return SimpleNamespace(shard=shard, shard_grad=torch.zeros_like(shard),
                           touched=torch.zeros(rows, dtype=torch.bool), start_row=0, stop_row=rows)


def test_dense_adamw_equals_torch_adamw_bitwise():
    t = _table()
    ref = torch.nn.Parameter(t.shard.clone())
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    opt = ShardedTableOptimizer(t, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, kind="adamw")
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grad = torch.randn(t.shard.shape, generator=g)
        t.shard_grad.copy_(grad)
        ref.grad = grad.clone()
        lr = 1e-2 * (1 - 0.1 * step)
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()
        opt.step(lr=lr)
        assert torch.equal(t.shard, ref.detach()), f"step {step}"


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
