"""JTok / JTok-M inside Megatron-Core's TransformerLayer, through ModuleSpec submodules only.

Megatron's TransformerLayer ends its MLP half with its ``mlp_bda`` submodule (bias-dropout-add):
``mlp_bda(training, fused)((dm, bias), residual, p)`` computes ``residual + dropout(dm + bias)``. That is the
one place where the paper's equations meet the layer, for dense MLP and MoE alike:

    JTok    (dm, residual) -> (dm * p, residual)          h' = h~ + dm * p
    JTok-M  (dm, residual) -> (dm, residual + dr)         h' = h~ + dm + dr

JTok-M's router reads the *layer input* h (before attention), so the layer computes dr when it is entered
and its ``mlp_bda`` adds it at the residual write-back. Three spec fields carry it all: the layer class is the
spec's ``module`` (it only gathers the micro-batch's rows on entry), the JTok math module is the spec's
``jtok`` submodule, and ``mlp_bda`` becomes :class:`JTokBiasDropoutAdd` around the spec's own bias-dropout-add.
So a layer spec (local or Transformer Engine) gains JTok by swapping fields; no private method of Megatron's
layer is overridden (``_forward_post_mlp`` is renamed on Megatron-LM's main), nothing is forked.
"""

from __future__ import annotations

import collections
import copy
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

import jtok_train.compat.megatron as megatron_compat
from jtok_train.model.jtok import JTok, JTokM
from jtok_train.tables.rows import TokenRows, TokenRowsContext

__all__ = ["JTokBiasDropoutAdd", "JTokLayerSubmodules", "JTokTransformerLayer", "with_jtok", "JTOKM_AUX_LOSS_NAME"]

JTOKM_AUX_LOSS_NAME = "jtokm_load_balancing_loss"


class JTokBiasDropoutAdd(torch.nn.Module):
    """The layer's ``mlp_bda``: JTok's gate on the FFN increment (or JTok-M's dr on the residual), then the
    spec's own bias-dropout-add. Megatron calls ``mlp_bda(training, fused)`` for the function it applies to
    ``((dm, bias), residual, dropout_p)`` (the same convention in 0.16.1 and 0.19.2). Holds no parameters
    (the JTok parameters stay the layer's ``jtok`` submodule, so checkpoints keep their keys)."""

    def __init__(self, bda: ModuleSpec | Callable[..., Any]):
        super().__init__()
        self.bda = build_module(bda)
        self._layer: Callable[[], "JTokTransformerLayer | None"] = lambda: None

    def bind(self, layer: "JTokTransformerLayer") -> None:
        self._layer = weakref.ref(layer)   # a weak reference: the layer owns this module, not the reverse

    def forward(self, training: bool, fused: bool) -> Callable[..., torch.Tensor]:
        base = self.bda(training, fused)
        layer = self._layer()
        if layer is None:
            raise RuntimeError("JTokBiasDropoutAdd is not bound to a JTokTransformerLayer")

        def bias_dropout_add(x_with_bias, residual, prob):
            dm, bias = x_with_bias
            dm, bias, residual = layer.modulate(dm, bias, residual)
            return base((dm, bias), residual, prob)

        return bias_dropout_add


@dataclass
class JTokLayerSubmodules(TransformerLayerSubmodules):
    """Megatron's layer submodules plus ``jtok``: a ModuleSpec of JTok or JTokM (IdentityOp = none)."""

    jtok: ModuleSpec | type = IdentityOp


class JTokTransformerLayer(TransformerLayer):
    """Megatron TransformerLayer with a JTok / JTok-M submodule. Everything else is Megatron's."""

    def __init__(self, config, submodules: JTokLayerSubmodules, *args: Any, token_context: TokenRowsContext, **kwargs: Any):
        super().__init__(config, submodules, *args, **kwargs)
        self.token_context = token_context
        self.jtok = build_module(submodules.jtok)
        if not isinstance(self.mlp_bda, JTokBiasDropoutAdd):
            raise TypeError("a JTokTransformerLayer's mlp_bda must be JTokBiasDropoutAdd: build its spec with with_jtok()")
        self.mlp_bda.bind(self)
        # With sequence parallelism each TP rank sees its own sequence shard, so the JTok parameters'
        # gradients are partial sums over TP ranks: Megatron all-reduces params marked like this.
        for p in self.jtok.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        self._pending: torch.Tensor | None = None
        self._replay: collections.deque[TokenRows] = collections.deque()   # rows queued for full recompute
        self.replays = 0   # forwards replayed by full recompute (tests, logging)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_load: torch.Tensor | None = None   # JTok-M f_i of the last forward (logging)
        # this layer's rows in the stage's token table (its place among the stage's layers; the model sets it)
        self.table_index = self.layer_number - 1


    def _rows_for_this_forward(self) -> tuple[TokenRows, torch.Tensor]:
        """The micro-batch's rows and this layer's slice of them. Under Megatron's full recompute the layer
        runs twice: first inside the model's forward with grad disabled (the checkpointed forward: the rows
        are queued), then in the backward, outside any model forward (the replay: the queued rows are taken
        in order, detached, and their gradient goes to the micro-batch's ReplayGradSink)."""
        ctx = self.token_context
        if ctx.current is None and self._replay and torch.is_grad_enabled():
            rows = self._replay.popleft()
            self.replays += 1
            i = self.table_index
            leaf = rows.layer(i).detach().requires_grad_(rows.unique_rows.requires_grad)
            if leaf.requires_grad:
                sink, like = rows.replay_sink, rows.unique_rows
                leaf.register_hook(lambda g: sink.add(i, like, g))
            return rows, leaf
        rows = ctx.rows()
        if rows.replay_sink is not None and self.training and not torch.is_grad_enabled():
            self._replay.append(rows)
        return rows, rows.layer(self.table_index)

    @property
    def _in_checkpointed_forward(self) -> bool:
        rows = self.token_context.current
        return rows is not None and rows.replay_sink is not None and not torch.is_grad_enabled()

    def _local_rows(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, layer_rows = self._rows_for_this_forward()
        inverse = rows.inverse
        s_local, b = hidden_states.shape[0], hidden_states.shape[1]
        if inverse.numel() != s_local * b:
            # Sequence parallel: this TP rank holds sequence positions [r*s_local, (r+1)*s_local).
            r = self.pg_collection.tp.rank()
            inverse = inverse.view(-1, b)[r * s_local : (r + 1) * s_local].reshape(-1)
        return layer_rows, inverse

    def forward(self, *args: Any, **kwargs: Any):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        checkpointed = self._in_checkpointed_forward
        self._rows = self._local_rows(hidden_states)
        if isinstance(self.jtok, JTokM):
            cfg = self.config
            group = self.pg_collection.tp if cfg.sequence_parallel else None   # ranks holding this sequence's shards
            out = self.jtok(hidden_states, *self._rows, sequence_group=group)
            residual = out.residual.to(hidden_states.dtype)
            if self.training and torch.is_grad_enabled() and self.jtok.aux_loss_coeff > 0:
                # Joins Megatron's MoE aux-loss mechanism: the aux gradient rides on dr's backward, scaled as
                # the installed Megatron scales its router's aux loss.
                residual = megatron_compat.attach_aux_loss(
                    residual, out.aux_loss, per_token_loss=bool(getattr(cfg, "calculate_per_token_loss", False)),
                    num_local_tokens=hidden_states.shape[0] * hidden_states.shape[1],
                    tp_cp_size=(getattr(self.pg_collection, "tp_cp", None) or self.pg_collection.tp).size())
            if self.training and not checkpointed:
                # as Megatron's router: logged in training only, and by a recomputed layer once (from the replay)
                # logged like the router's load_balancing_loss: without the coefficient, summed over the shards
                megatron_compat.record_aux_loss(JTOKM_AUX_LOSS_NAME, out.balance, self.layer_number,
                                                cfg.num_layers, reduce_group=group)
            self.last_load = out.load
            self._pending = residual
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._pending, self._rows = None, None

    def modulate(self, dm: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor):
        """(dm, bias, residual) before the bias-dropout-add (called by this layer's mlp_bda)."""
        if isinstance(self.jtok, JTok):
            if bias is not None:   # the gate multiplies the whole increment, bias included
                dm, bias = dm + bias, None
            dm = self.jtok(dm, *self._rows)
        elif self._pending is not None:
            residual = residual + self._pending
        return dm, bias, residual


def with_jtok(layer_spec: ModuleSpec, jtok_spec: ModuleSpec, token_context: TokenRowsContext) -> ModuleSpec:
    """Turn a Megatron GPT layer spec (local or TE, dense or MoE) into a JTok / JTok-M layer spec."""
    base = layer_spec.submodules
    if not isinstance(base, TransformerLayerSubmodules):
        raise TypeError(f"expected a TransformerLayer spec, got submodules of type {type(base).__name__}")
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    fields["mlp_bda"] = ModuleSpec(module=JTokBiasDropoutAdd, params={"bda": base.mlp_bda})
    submodules = JTokLayerSubmodules(**fields, jtok=jtok_spec)
    params = dict(copy.copy(layer_spec.params or {}))
    params["token_context"] = token_context
    return ModuleSpec(module=JTokTransformerLayer, params=params, submodules=submodules)


def jtok_module_spec(variant: str, **params: Any) -> ModuleSpec:
    """ModuleSpec of the JTok math module for ``variant`` in {'jtok', 'jtokm'}."""
    module = {"jtok": JTok, "jtokm": JTokM}[variant]
    return ModuleSpec(module=module, params=params)
