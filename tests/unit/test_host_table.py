"""HostTokenTable (JTok tables in host memory for inference) against the training path's replicated table."""

from __future__ import annotations

import pytest
import torch

from jtok_train.tables.host import HostTokenTable, bytes_per_token
from jtok_train.tables.replicated import ReplicatedTokenTable


@pytest.mark.parametrize("shape", [(2, 7), (1, 1), (3, 16)])
def test_rows_match_the_replicated_table_on_random_ids(shape):
    g = torch.Generator().manual_seed(sum(shape))
    ref = ReplicatedTokenTable(vocab_size=97, num_layers=3, num_sets=5, hidden_size=8, seed=11)
    host = HostTokenTable(ref.weight.detach(), "cpu")
    for prefetched in (False, True):
        ids = torch.randint(0, 97, shape, generator=g)
        if prefetched:
            host.prefetch(ids.clone())
        got, want = host.lookup(ids), ref.lookup(ids)
        assert torch.equal(got.unique_ids, want.unique_ids)
        assert torch.equal(got.inverse, want.inverse)
        assert torch.equal(got.unique_rows, want.unique_rows.detach())
        # what every layer sees per position, [T, n_e, d], in Megatron's [s, b] order
        for layer in range(3):
            expanded = got.layer(layer)[got.inverse]
            assert torch.equal(expanded, ref.weight.detach()[ids.t().reshape(-1), layer])
        assert got.unique_rows.data_ptr() != host.table.data_ptr()   # a copy crossed, not a view of the table


def test_bytes_counted_per_unique_id_and_errors():
    table = torch.randn(50, 2, 5, 4)
    host = HostTokenTable(table)
    row = bytes_per_token(2, 5, 4, torch.float32)
    assert row == 2 * 5 * 4 * 4 == host.row_bytes
    host.lookup(torch.tensor([[3, 3, 9, 3]]))     # prefill: two unique ids
    host.lookup(torch.tensor([[9]]))               # a decode step
    assert host.stats.as_dict() == {"lookups": 2, "positions": 5, "unique_ids": 3, "bytes_to_device": 3 * row,
                                    "bytes_per_position": 3 * row / 5}
    host.prefetch(torch.tensor([[1]]))
    with pytest.raises(RuntimeError, match="differ from the prefetched"):
        host.lookup(torch.tensor([[2]]))
    with pytest.raises(ValueError, match="outside the JTok table's vocabulary"):
        host.lookup(torch.tensor([[50]]))
    with pytest.raises(ValueError, match=r"\[V, L, n_e, d\]"):
        HostTokenTable(torch.randn(50, 4))
    assert HostTokenTable(table.to(torch.bfloat16)).row_bytes == row // 2
