"""The exchange's stream discipline, checked on CPU: a recording stand-in for the CUDA stream calls
(jtok_train/testing/streams.py) runs a real 2-rank training of MoE + JTok-M with sharded tables and overlap,
and sees every tensor that crosses between the compute and the side stream handed over (a wait and
record_stream), and no write to a tensor the other stream may still read. With the hand-off of the row
gradients removed on purpose (the bug a reading of the code found: autograd's gradient read on the side stream
without record_stream), the same run reports exactly that."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from jtok_train.testing import run_distributed
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed


def _recorded_training(runs: list[tuple[list[str], bool]]) -> list[dict]:
    from jtok_train.config import compose
    from jtok_train.tables import exchange
    from jtok_train.testing.streams import RecordingStreams
    from jtok_train.training.trainer import build_trainer

    out = []
    for overrides, break_grad_handoff in runs:
        rec = RecordingStreams()
        exchange.STREAMS_OVERRIDE = rec
        original = exchange.RowLookup.send_grads
        if break_grad_handoff:
            class _WithoutInputs:        # the side stream, but run() forgets the tensors it was given
                def __init__(self, side):
                    self.side = side

                @contextmanager
                def run(self, *inputs):
                    with self.side.run():
                        yield

                def __getattr__(self, name):
                    return getattr(self.side, name)

            def send_grads(self, grad_rows, scale):
                side, self.stream = self.stream, _WithoutInputs(self.stream)
                try:
                    original(self, grad_rows, scale)
                finally:
                    self.stream = side

            exchange.RowLookup.send_grads = send_grads
        try:
            tr = build_trainer(compose(overrides))
            rec.host(tr.module.table.placement.position_of)   # a CPU tensor on a GPU too, read with host ids
            rec.start()
            try:
                tr.fit()
            finally:
                rec.stop()
        finally:
            exchange.STREAMS_OVERRIDE = None
            exchange.RowLookup.send_grads = original
        out.append({"violations": sorted(set(rec.violations)), "counts": dict(rec.counts)})
    return out


def test_every_cross_stream_tensor_is_handed_over(small_dataset, tmp_path):
    base = dict(**{"parallel.embedding": "sharded", "parallel.overlap": "true", "train.train_iters": 2,
                   "train.eval_samples": 8})
    runs = [(tiny_overrides(small_dataset, str(tmp_path / "ok"), **base), False),
            (tiny_overrides(small_dataset, str(tmp_path / "broken"), **base), True)]
    got = run_distributed(_recorded_training, 2, runs, timeout=900)
    for rank in got:
        ok, broken = rank
        c = ok["counts"]
        # the check really ran: side-stream blocks, cross-stream reads, waits and records all happened
        assert c["side_blocks"] > 0 and c["cross_stream_reads"] > 0 and c["waits"] > 0 and c["records"] > 0, c
        assert ok["violations"] == [], ok["violations"][:5]
        # the removed hand-off is reported, as the only violation: the gradient read on the side stream (by the
        # 1/DP scaling, the first op there that reads it: 2 data-parallel ranks)
        assert broken["violations"], "the broken hand-off went unnoticed"
        assert all(v.startswith("read without record_stream: mul reads on side") for v in broken["violations"]), \
            broken["violations"][:5]
