"""JTok / JTok-M against a naive reference written straight from the paper's equations (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from jtok_train.model.jtok import JTok, JTokM, load_balancing_loss
from jtok_train.tables.init import INIT_CHUNK, init_rows_for_permuted_range, row_permutation
from jtok_train.tables.replicated import ReplicatedTokenTable
from jtok_train.tables.rows import TokenRows, check_token_ids


def naive_normalize(u, eps):
    return u / (torch.sqrt((u * u).sum()) + eps)


def naive_jtok(dm, table, ids, s, eps):
    """h' - h~ = dm * (1 + s * normalize(E[x])), position by position."""
    out = torch.empty_like(dm)
    for t in range(dm.shape[0]):
        out[t] = dm[t] * (1 + s * naive_normalize(table[ids[t]], eps))
    return out


def naive_rmsnorm(h, w, eps):
    return h / torch.sqrt((h * h).mean() + eps) * w


def naive_jtokm(h, tables, ids, R, w_norm, s, K, N_l, eps, norm_eps):
    """dr for each position: router on RMSNorm(h), sigmoid top-K renormalised, blend, L2, scale."""
    T, d = h.shape
    out = torch.empty_like(h)
    for t in range(T):
        g = naive_rmsnorm(h[t], w_norm, norm_eps) @ R
        G = sorted(range(g.shape[0]), key=lambda i: -float(g[i]))[:K]
        denom = sum(torch.sigmoid(g[j]) for j in G)
        e = sum(torch.sigmoid(g[i]) / denom * tables[ids[t], i] for i in G)
        out[t] = s * naive_normalize(e, eps) / math.sqrt(2 * N_l)
    return out


def dedup(ids):
    u, inv = torch.unique(ids, sorted=True, return_inverse=True)
    return u, inv


@pytest.mark.parametrize("T,d,V", [(37, 13, 11), (5, 7, 3)])
def test_jtok_forward_and_grads_match_naive(T, d, V):
    torch.manual_seed(T * 100 + d)
    ids = torch.randint(0, V, (T,))
    ids[1] = ids[0]  # repeated ids
    table = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    dm = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    mod = JTok(d, eps=1e-6).double()
    with torch.no_grad():
        mod.scale.copy_(torch.randn(d, dtype=torch.float64))
    u, inv = dedup(ids)
    out = mod(dm, table[u], inv)
    s_ref = mod.scale.detach().clone().requires_grad_(True)
    ref = naive_jtok(dm, table, ids, s_ref, 1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (dm, table, mod.scale), g)
    grads_ref = torch.autograd.grad(ref, (dm, table, s_ref), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_jtok_scale_zero_is_identity():
    torch.manual_seed(0)
    mod = JTok(19)  # default scale_init = 0
    dm = torch.randn(23, 19)
    rows = torch.randn(6, 19)
    inv = torch.randint(0, 6, (23,))
    assert torch.equal(mod(dm, rows, inv), dm)


@pytest.mark.parametrize("K,n_e", [(1, 5), (2, 5), (5, 5), (2, 3)])
def test_jtokm_forward_and_grads_match_naive(K, n_e):
    torch.manual_seed(K * 10 + n_e)
    T, d, V, L = 29, 11, 7, 6
    ids = torch.randint(0, V, (T,))
    h = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    tables = torch.randn(V, n_e, d, dtype=torch.float64, requires_grad=True)
    mod = JTokM(d, n_e, K, num_layers=L, router_init_std=1.0).double()
    with torch.no_grad():
        mod.scale.copy_(torch.randn(d, dtype=torch.float64))
        mod.router_norm.weight.copy_(1 + 0.1 * torch.randn(d, dtype=torch.float64))
    u, inv = dedup(ids)
    out = mod(h, tables[u], inv)
    params = [p.detach().clone().requires_grad_(True) for p in (mod.router, mod.router_norm.weight, mod.scale)]
    ref = naive_jtokm(h, tables, ids, params[0], params[1], params[2], K, L, mod.eps, mod.router_norm.eps)
    torch.testing.assert_close(out.residual, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.residual, (h, tables, mod.router, mod.router_norm.weight, mod.scale), g)
    want = torch.autograd.grad(ref, (h, tables, *params), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_jtokm_aux_loss_matches_formula():
    torch.manual_seed(3)
    T, d, n_e, K = 41, 9, 5, 2
    mod = JTokM(d, n_e, K, num_layers=4, router_init_std=1.0, aux_loss_coeff=1e-4).double()
    h = torch.randn(T, d, dtype=torch.float64)
    out = mod(h, torch.randn(3, n_e, d, dtype=torch.float64), torch.randint(0, 3, (T,)))
    g = mod.router_norm(h) @ mod.router
    sig = torch.sigmoid(g)
    P = (sig / sig.sum(-1, keepdim=True)).mean(0)
    top = torch.topk(g, K, dim=-1).indices
    f = torch.tensor([(top == i).sum().item() for i in range(n_e)], dtype=torch.float64) / (T * K)
    expected = 1e-4 * n_e * float((P * f).sum())
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(out.load, f)
    # uniform routing gives the minimum lambda * 1 (P_i = f_i = 1/n_e)
    loss, _ = load_balancing_loss(torch.full((10, 4), 0.25), torch.arange(20).view(10, 2) % 4, 4, 1.0)
    assert loss.item() == pytest.approx(1.0)


def test_jtokm_depth_scaling_and_validation():
    assert JTokM(8, 5, 2, num_layers=8).depth_factor == pytest.approx(1 / 4)
    assert JTokM(8, 5, 2, num_layers=8, depth_scaling=False).depth_factor == 1.0
    with pytest.raises(ValueError, match="top_k=6"):
        JTokM(8, 5, 6, num_layers=2)


def test_table_init_is_per_token_and_independent_of_ranges():
    V, shape, seed = 2 * INIT_CHUNK + 123, (2, 1, 3), 7
    full = init_rows_for_permuted_range(0, V, shape, seed)
    # any split of the permuted order into contiguous blocks gives the same rows
    for cuts in ([0, 5000, V], [0, 1, 4097, 8191, V], [0, V // 3, 2 * V // 3, V]):
        parts = [init_rows_for_permuted_range(a, b, shape, seed) for a, b in zip(cuts[:-1], cuts[1:])]
        assert torch.equal(torch.cat(parts), full)
    perm = row_permutation(V, seed)
    assert sorted(perm.tolist()) == list(range(V))
    table = ReplicatedTokenTable(V, 2, 1, 3, seed=seed)
    assert torch.equal(table.weight.data[perm], full)


def test_replicated_lookup_dedups_in_sb_order_and_checks_ids():
    table = ReplicatedTokenTable(50, 3, 2, 4, seed=1)
    ids = torch.tensor([[1, 7, 7, 3], [3, 3, 49, 1]])  # [b, s]
    rows = table.lookup(ids)
    assert rows.unique_ids.tolist() == [1, 3, 7, 49]
    flat_sb = ids.t().reshape(-1)
    assert torch.equal(rows.unique_ids[rows.inverse], flat_sb)
    assert torch.equal(rows.unique_rows, table.weight[rows.unique_ids])
    assert rows.layer(2).shape == (4, 2, 4)
    with pytest.raises(ValueError, match=r"token id 50 is outside .*model.vocab_size=50"):
        table.lookup(torch.tensor([[0, 50]]))
    with pytest.raises(ValueError, match=r"token id -1"):
        check_token_ids(torch.tensor([-1, 2]), 10)


def test_layer_rows_share_one_unbind_and_give_the_per_slice_gradient_bitwise():
    """TokenRows.layer: with autograd every layer's rows come out of one unbind (one backward node stacks the
    L gradients), without autograd plain slices; the buffer's gradient is bitwise that of indexing [:, i] per
    layer (every entry is one layer's gradient either way). Fresh random rows, weights and layers used."""
    g = torch.Generator().manual_seed(7)
    U, L, n_e, d = 13, 5, 3, 8
    buffer = torch.randn(U, L, n_e, d, generator=g, requires_grad=True)
    weights = [torch.randn(U, n_e, d, generator=g) for _ in range(L)]
    used = [0, 2, 3]   # a layer may go unused (its gradient is zero), as under partial recompute
    rows = TokenRows(unique_ids=torch.arange(U), unique_rows=buffer, inverse=torch.arange(U))
    views = [rows.layer(i) for i in used]
    assert len({id(v.grad_fn) for v in views}) == 1 and type(views[0].grad_fn).__name__.startswith("Unbind")
    sum((v.sin() * weights[i]).sum() for i, v in zip(used, views)).backward()
    got, buffer.grad = buffer.grad.clone(), None
    sum((buffer[:, i].sin() * weights[i]).sum() for i in used).backward()
    assert torch.equal(got, buffer.grad)
    assert torch.count_nonzero(got[:, [1, 4]]) == 0
    with torch.no_grad():
        assert rows.layer(1).grad_fn is None and torch.equal(rows.layer(1), buffer[:, 1])
