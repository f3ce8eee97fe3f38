"""The replicated token table: every rank holds the JTok rows of its stage's layers as one model parameter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import Tensor, nn

from jtok_train.tables.init import init_rows_for_permuted_range, row_permutation
from jtok_train.tables.rows import LayerSlice, TokenRows, check_token_ids, dedup, positions

__all__ = ["ReplicatedTokenTable"]


class ReplicatedTokenTable(nn.Module):
    """The JTok tables of this stage's layers as one local parameter ``weight`` of shape [V, L, n_e, d].

    One row per token holds every layer's candidates, so a lookup is one gather of the unique ids.
    Gradients are dense over the table (as an unsharded model computes them) and reduced across
    data-parallel ranks like any other parameter. Under pipeline parallelism L is the stage's layer count
    (``layers``) and the checkpoint stores the stage's slice of the whole [V, L_total, n_e, d] table.

    A ``TokenRowProvider`` whose training hooks have nothing to do: Megatron's DDP, clipping and optimizer treat
    ``weight`` as the backbone's parameters.
    """

    has_own_optimizer = False   # ``weight`` is a model parameter: Megatron's optimizer steps it with the backbone

    def __init__(
        self,
        vocab_size: int,
        num_layers: int,
        num_sets: int,
        hidden_size: int,
        seed: int = 1234,
        init_std: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        layers: LayerSlice | None = None,
    ):
        super().__init__()
        self.layers = layers if layers is not None else LayerSlice(0, num_layers, num_layers)
        if self.layers.count != num_layers:
            raise ValueError(f"num_layers={num_layers} differs from the stage's layer count {self.layers.count}")
        self.vocab_size, self.num_layers, self.num_sets, self.hidden_size = vocab_size, num_layers, num_sets, hidden_size
        self.seed, self.init_std = seed, init_std
        self.weight = nn.Parameter(
            torch.empty(vocab_size, num_layers, num_sets, hidden_size, dtype=dtype, device=device)
        )
        self.weight.jtok_table = True   # marks the parameter for the table's own optimizer group
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        perm = row_permutation(self.vocab_size, self.seed)
        sl = self.layers
        rows = init_rows_for_permuted_range(
            0, self.vocab_size, (sl.total, *self.weight.shape[2:]), self.seed, self.init_std, self.weight.dtype,
            layers=(sl.offset, sl.count),
        )
        self.weight[perm.to(self.weight.device)] = rows.to(self.weight.device)

    def state(self, prefix: str = "") -> dict:
        """``weight`` as this stage's layers [offset, offset + L) of the global [V, L_total, n_e, d] tensor,
        replicated over tensor and data parallel ranks (the replica ids Megatron gives a plain parameter)."""
        sl = self.layers
        replica = (0, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True))
        return {f"{prefix}weight": ShardedTensor.from_rank_offsets(
            f"{prefix}weight", self.weight, (1, sl.stage, sl.num_stages), replica_id=replica)}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's GPTModel.sharded_state_dict calls this for its ``token_table`` child: ``state``."""
        return self.state(prefix)

    def lookup(self, token_ids: Tensor) -> TokenRows:
        check_token_ids(token_ids, self.vocab_size)
        unique_ids, inverse = dedup(positions(token_ids))
        rows = F.embedding(unique_ids, self.weight.view(self.vocab_size, -1))
        rows = rows.view(-1, self.num_layers, self.num_sets, self.hidden_size)
        return TokenRows(unique_ids=unique_ids, unique_rows=rows, inverse=inverse)

    # -- the rest of the provider interface: nothing to do, the table being one local model parameter ---------
    def prefetch(self, token_ids: Tensor) -> None:
        """No-op: the rows are local, a lookup is one gather (nothing to start ahead)."""

    def advance(self) -> None:
        """No-op: nothing is in flight between forwards."""

    def finish_backward(self) -> None:
        """No-op: autograd puts the gradient on ``weight`` and Megatron's DDP reduces it."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``nn.Module.zero_grad``: in training Megatron's optimizer has cleared ``weight``'s gradient already
        (it is the model's), so this clears nothing more; outside Megatron it clears a plain backward's."""
        super().zero_grad(set_to_none)

    def grad_norm_sq(self) -> float:
        """0.0: ``weight``'s gradient is in Megatron's own norm already."""
        return 0.0

    def scale_grad(self, coeff: float) -> None:
        """No-op: Megatron's clipping scales ``weight``'s gradient with the backbone's."""

    def step(self, lr: float) -> None:
        """No-op: Megatron's optimizer steps ``weight`` (its table group: LR multiplier, weight decay)."""

    def pop_stats(self) -> dict[str, float]:
        """``{}``: a local gather has nothing to count."""
        return {}
