"""JTok / JTok-M inside Megatron-Core's TransformerLayer, through a ModuleSpec submodule.

Megatron's TransformerLayer ends its MLP half with ``_forward_post_mlp((dm, bias), residual)``, which
computes ``residual + dropout(dm + bias)``. That is the one place where the paper's equations meet the
layer, for dense MLP and MoE alike:

    JTok    (dm, residual) -> (dm * p, residual)          h' = h~ + dm * p
    JTok-M  (dm, residual) -> (dm, residual + dr)         h' = h~ + dm + dr

JTok-M's router reads the *layer input* h (before attention), so the layer computes dr when it is
entered and adds it at the residual write-back. The layer class is the spec's ``module``; the JTok
math module is the spec's ``jtok`` submodule, so a layer spec (local or Transformer Engine) gains
JTok by swapping two fields and nothing is forked.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from jtok_train.model.jtok import JTok, JTokM
from jtok_train.model.token_table import TokenRows, TokenRowsContext

__all__ = ["JTokLayerSubmodules", "JTokTransformerLayer", "with_jtok", "JTOKM_AUX_LOSS_NAME"]

JTOKM_AUX_LOSS_NAME = "jtokm_load_balancing_loss"


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
        # With sequence parallelism each TP rank sees its own sequence shard, so the JTok parameters'
        # gradients are partial sums over TP ranks: Megatron all-reduces params marked like this.
        for p in self.jtok.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        self._pending: torch.Tensor | None = None
        self._replay: collections.deque[TokenRows] = collections.deque()   # rows queued for full recompute
        self.replays = 0   # forwards replayed by full recompute (tests, logging)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_load: torch.Tensor | None = None   # JTok-M f_i of the last forward (logging)

    @property
    def table_index(self) -> int:
        return self.layer_number - 1   # the provider holds the layers of this stage (PP = 1 for now)

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
            out = self.jtok(hidden_states, *self._rows)
            residual = out.residual.to(hidden_states.dtype)
            if self.training and torch.is_grad_enabled() and self.jtok.aux_loss_coeff > 0:
                # Joins Megatron's MoE aux-loss mechanism: the aux gradient rides on dr's backward.
                residual = MoEAuxLossAutoScaler.apply(residual, out.aux_loss)
            if not checkpointed:   # a recomputed layer reports its aux loss once, from the replay (as Megatron's router)
                save_to_aux_losses_tracker(
                    JTOKM_AUX_LOSS_NAME, out.aux_loss.detach(), self.layer_number, self.config.num_layers
                )
            self.last_load = out.load
            self._pending = residual
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._pending, self._rows = None, None

    def _forward_post_mlp(self, mlp_output_with_bias, residual):
        dm, bias = mlp_output_with_bias
        if isinstance(self.jtok, JTok):
            if bias is not None:   # the gate multiplies the whole increment, bias included
                dm, bias = dm + bias, None
            dm = self.jtok(dm, *self._rows)
        elif self._pending is not None:
            residual = residual + self._pending
        return super()._forward_post_mlp((dm, bias), residual)


def with_jtok(layer_spec: ModuleSpec, jtok_spec: ModuleSpec, token_context: TokenRowsContext) -> ModuleSpec:
    """Turn a Megatron GPT layer spec (local or TE, dense or MoE) into a JTok / JTok-M layer spec."""
    base = layer_spec.submodules
    if not isinstance(base, TransformerLayerSubmodules):
        raise TypeError(f"expected a TransformerLayer spec, got submodules of type {type(base).__name__}")
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    submodules = JTokLayerSubmodules(**fields, jtok=jtok_spec)
    params = dict(copy.copy(layer_spec.params or {}))
    params["token_context"] = token_context
    return ModuleSpec(module=JTokTransformerLayer, params=params, submodules=submodules)


def jtok_module_spec(variant: str, **params: Any) -> ModuleSpec:
    """ModuleSpec of the JTok math module for ``variant`` in {'jtok', 'jtokm'}."""
    module = {"jtok": JTok, "jtokm": JTokM}[variant]
    return ModuleSpec(module=module, params=params)
