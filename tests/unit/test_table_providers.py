"""Every token-row provider against the provider interface (``jtok_train.tables.rows.TokenRowProvider``): each
class implements every member with a compatible signature, the check fails a provider that does not (so it can
fail), the model builder refuses one in one line, and each provider does what its hooks say (in this process: the
sharded table over a 1-rank gloo group)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
import torch.distributed as dist

import jtok_train.inference
import jtok_train.tables
from jtok_train.tables.host import HostTokenTable
from jtok_train.tables.hot import HotRows
from jtok_train.tables.optimizer import ShardedTableOptimizer
from jtok_train.tables.replicated import ReplicatedTokenTable
from jtok_train.tables.rows import TokenRowProvider, TokenRows, check_provider, provider_errors
from jtok_train.tables.sharded import ShardedTokenTable

pytestmark = pytest.mark.check

PROVIDERS = [ReplicatedTokenTable, ShardedTokenTable, HostTokenTable]
# classes with a ``lookup`` that are not providers: the sharded table's replicas of its hot rows (hot.py), whose
# lookup serves part of a ShardedTokenTable's lookup (the hot-row variant is ShardedTokenTable(hot_ids=...))
NOT_PROVIDERS = {HotRows}
MEMBERS = ("lookup", "prefetch", "advance", "finish_backward", "zero_grad", "grad_norm_sq", "scale_grad", "step",
           "state", "pop_stats", "has_own_optimizer")


def test_the_protocol_declares_every_member_the_loop_calls():
    declared = {n for n in vars(TokenRowProvider) if not n.startswith("_")}
    assert declared == set(MEMBERS)
    assert {"num_layers", "num_sets", "hidden_size", "vocab_size"} <= set(TokenRowProvider.__annotations__)


def test_every_class_with_a_lookup_is_a_checked_provider():
    """A new provider in tables/ or inference/ joins PROVIDERS (and so the checks below)."""
    found = set()
    for pkg in (jtok_train.tables, jtok_train.inference):
        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            for _, cls in inspect.getmembers(importlib.import_module(info.name), inspect.isclass):
                if cls.__module__ == info.name and "lookup" in vars(cls) and cls is not TokenRowProvider:
                    found.add(cls)
    assert found == set(PROVIDERS) | NOT_PROVIDERS, found


@pytest.mark.parametrize("cls", PROVIDERS, ids=lambda c: c.__name__)
def test_provider_implements_every_member_with_a_compatible_signature(cls):
    assert provider_errors(cls) == []
    check_provider(cls)
    want = {n: inspect.signature(getattr(TokenRowProvider, n)) for n in MEMBERS if n != "has_own_optimizer"}
    for name, sig in want.items():   # the same parameter names, in the same order (after self)
        got = inspect.signature(getattr(cls, name))
        assert list(got.parameters)[1:len(sig.parameters)] == list(sig.parameters)[1:], (cls.__name__, name)
    assert isinstance(inspect.getattr_static(cls, "has_own_optimizer"), (bool, property))


class _Complete:
    """A minimal third-party provider: every member, so the check passes (it is not vacuous either way)."""

    has_own_optimizer = False

    def __init__(self):
        self.num_layers, self.num_sets, self.hidden_size, self.vocab_size = 1, 1, 4, 8

    def lookup(self, token_ids, *extra):
        raise NotImplementedError

    def prefetch(self, token_ids):
        pass

    def advance(self):
        pass

    def finish_backward(self):
        pass

    def zero_grad(self, set_to_none=True):   # an extra parameter with a default is compatible
        pass

    def grad_norm_sq(self):
        return 0.0

    def scale_grad(self, coeff):
        pass

    def step(self, lr, **options):
        pass

    def state(self, prefix=""):
        return {}

    def pop_stats(self):
        return {}


class _NoStepAtAll:
    """Incomplete: everything but ``step`` and ``state``."""

    has_own_optimizer = False
    lookup, prefetch, advance = _Complete.lookup, _Complete.prefetch, _Complete.advance
    finish_backward, zero_grad, grad_norm_sq = _Complete.finish_backward, _Complete.zero_grad, _Complete.grad_norm_sq
    scale_grad, pop_stats = _Complete.scale_grad, _Complete.pop_stats


class _WrongSignatures(_Complete):
    def scale_grad(self):                 # takes no coefficient
        pass

    def step(self, learning_rate):        # the loop calls step(lr=...)
        pass

    def state(self, prefix):              # the protocol's prefix is optional
        return {}


class _DeclaredOnly(TokenRowProvider):
    """Subclasses the Protocol and implements only lookup: the inherited declarations do not count."""

    has_own_optimizer = False

    def lookup(self, token_ids):
        raise NotImplementedError


def test_the_check_passes_a_complete_provider_and_fails_incomplete_ones():
    assert provider_errors(_Complete) == [] and provider_errors(_Complete()) == []
    with pytest.raises(TypeError) as e:
        check_provider(_NoStepAtAll)
    msg = str(e.value)
    assert "\n" not in msg and "_NoStepAtAll" in msg and "lacks step" in msg and "1 more" in msg   # and state
    assert provider_errors(_NoStepAtAll)[1].endswith("lacks state (jtok_train.tables.rows.TokenRowProvider)")
    with pytest.raises(TypeError, match=r"\._NoStepAtAll is not a token-row provider: it lacks step"):
        check_provider(_NoStepAtAll())
    errors = provider_errors(_WrongSignatures)
    assert [e.split(" ")[0].rsplit(".", 1)[-1] for e in errors] == ["scale_grad", "step", "state"], errors
    assert "takes () where TokenRowProvider's takes (coeff)" in errors[0]
    missing = {e.rsplit("lacks ", 1)[-1].split(" ")[0] for e in provider_errors(_DeclaredOnly)}
    assert missing == set(MEMBERS) - {"lookup", "has_own_optimizer"}
    # an instance must also have the data attributes
    bare = _Complete()
    del bare.vocab_size
    with pytest.raises(TypeError, match="_Complete is not a token-row provider: its instance lacks the attribute "
                                        "vocab_size"):
        check_provider(bare)


def test_the_model_refuses_an_incomplete_provider_in_one_line():
    """JTokGPTModel checks its provider before anything else is built (no Megatron state needed to fail)."""
    from jtok_train.model.builder import JTokGPTModel
    from jtok_train.tables.rows import TokenRowsContext

    with pytest.raises(TypeError, match=r"^\S+\._NoStepAtAll is not a token-row provider: it lacks step "):
        JTokGPTModel(token_table=_NoStepAtAll(), token_context=TokenRowsContext())


# -- what each provider does -----------------------------------------------------------------------------------

def _ids(b=2, s=5, vocab=23, seed=0):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def test_replicated_table_leaves_its_gradient_and_step_to_megatron():
    table = ReplicatedTokenTable(vocab_size=23, num_layers=2, num_sets=3, hidden_size=4, seed=5)
    assert table.has_own_optimizer is False
    ids = _ids()
    want = table.lookup(ids)
    table.prefetch(ids)             # nothing to start ahead: the lookup is the same
    rows = table.lookup(ids)
    table.advance()
    assert torch.equal(rows.unique_rows, want.unique_rows) and torch.equal(rows.inverse, want.inverse)
    rows.unique_rows.square().sum().backward()
    grad, before = table.weight.grad.clone(), table.weight.detach().clone()
    assert grad.abs().sum() > 0
    table.finish_backward()
    table.scale_grad(0.5)
    assert table.grad_norm_sq() == 0.0          # its gradient is in Megatron's norm, not added twice
    table.step(lr=1.0)
    assert torch.equal(table.weight.grad, grad) and torch.equal(table.weight.detach(), before)
    assert table.pop_stats() == {}
    table.zero_grad()                           # nn.Module's: a plain backward's gradient cleared
    assert table.weight.grad is None and table.grad_norm_sq() == 0.0


def test_host_table_hooks_are_inference_no_ops_and_its_state_is_the_table():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    full = torch.randn(23, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    host = HostTokenTable(full)
    assert host.has_own_optimizer is False
    ids = _ids()
    host.prefetch(ids)
    rows = host.lookup(ids)
    host.advance()
    assert isinstance(rows, TokenRows) and torch.equal(rows.unique_rows, full[rows.unique_ids])
    for hook in (host.finish_backward, host.zero_grad, lambda: host.scale_grad(0.5), lambda: host.step(lr=1.0)):
        hook()
    assert host.grad_norm_sq() == 0.0 and torch.equal(host.table, full)
    stats = host.pop_stats()
    assert stats["lookups"] == 1 and stats["unique_ids"] == rows.unique_ids.numel()
    assert host.pop_stats()["lookups"] == 0      # popped: counting afresh
    (key, st), = host.state("token_table.").items()
    assert key == "token_table.weight" and isinstance(st, ShardedTensor)
    assert tuple(st.global_shape) == (23, 2, 3, 4) and st.data is host.table


@pytest.fixture
def one_rank_group():
    """The default process group over this process alone (gloo), removed after the test."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("hot", [False, True], ids=["plain", "hot_rows"])
def test_sharded_table_hooks_on_one_rank(one_rank_group, hot):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    kw = dict(vocab_size=23, num_layers=2, num_sets=3, hidden_size=4, group=one_rank_group, seed=5, overlap=True,
              hot_ids=[1, 7] if hot else None)
    table, twin = ShardedTokenTable(**kw), ShardedTokenTable(**kw)
    assert table.has_own_optimizer is True
    with pytest.raises(RuntimeError, match="no optimizer to step"):
        table.step(lr=1.0)
    opt, twin_opt = (ShardedTableOptimizer(t, 0.1, (0.9, 0.95), 1e-8) for t in (table, twin))
    assert table.optimizer is opt
    for t in (table, twin):
        t.zero_grad()
        for seed in (0, 1):                 # two micro-batches, prefetched one ahead
            t.prefetch(_ids(seed=seed))
        for seed in (0, 1):
            rows = t.lookup(_ids(seed=seed))
            t.advance()
            rows.unique_rows.square().sum().backward()
        t.finish_backward()
    norm_sq = table.grad_norm_sq()
    held = float(table.shard_grad.double().square().sum())
    if hot:   # the replicas' gradient, counted once
        held += float(table.hot_grad.double().square().sum())
    assert norm_sq > 0 and norm_sq == pytest.approx(held, rel=1e-6)
    table.scale_grad(0.5)
    assert table.grad_norm_sq() == pytest.approx(norm_sq / 4, rel=1e-6)
    twin.scale_grad(0.5)
    table.step(lr=1e-2)                     # the provider's step is its optimizer's, bitwise
    twin_opt.step(lr=1e-2)
    assert torch.equal(table.shard, twin.shard) and opt.num_steps == twin_opt.num_steps == 1
    stats = table.pop_stats()
    assert stats["exchange/positions"] == 2 * 10 and table.pop_stats()["exchange/positions"] == 0
    table.zero_grad()
    assert table.grad_norm_sq() == 0.0
    (key, st), = table.state("token_table.").items()
    assert key == "token_table.shard" and isinstance(st, ShardedTensor) and tuple(st.global_shape) == (23, 2, 3, 4)
    assert table.sharded_state_dict("token_table.").keys() == table.state("token_table.").keys()
