"""JTok and JTok-M: token-indexed modulation of a transformer layer (arXiv:2602.00800).

Both modules are plain torch on local tensors. They never see the table itself: they get, per layer,
the rows of the *unique* token ids of the micro-batch (``unique_rows``, [U, n_e, d]) and the inverse
index that maps every position to its unique id (``inverse``, [T]). Positions are flattened in
Megatron's [s, b] order, so ``T = s * b`` and ``hidden.view(T, d)`` lines up with ``inverse``.

Normalising the U unique rows before expanding to T positions is the deduplication of the paper's
systems section applied to compute as well: O(U d) instead of O(T d) for the norm.

The equations (PAPER.md; paper Sec. 3):

    JTok    p  = 1 + s * normalize(E_l[x]);      h' = h~ + dm * p
    JTok-M  g  = RMSNorm(h) @ R;  G = TopK(g, K);  w_i = sigmoid(g_i) / sum_{j in G} sigmoid(g_j)
            e  = sum_{i in G} w_i E_{l,i}[x];     dr = s * normalize(e) / sqrt(2 N_l);  h' = h~ + dm + dr
            L_aux = lambda * n_e * sum_i P_i f_i
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jtok_kernels.ops import jtok_gate, jtokm_blend

__all__ = ["JTok", "JTokM", "JTokMOutput", "load_balancing_loss"]


class JTok(nn.Module):
    """Static JTok: gates the FFN increment with ``1 + s * normalize(E_l[x])``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, scale_init: float = 0.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        # s_l = 0 makes the module an exact identity at init (PAPER.md default).
        self.scale = nn.Parameter(torch.full((hidden_size,), float(scale_init)))
        self.scale.jtok_scale = True    # its own LR when jtok.scale_lr_mult != 1 (training/optim.py)

    def forward(self, ffn_increment: Tensor, unique_rows: Tensor, inverse: Tensor) -> Tensor:
        """ffn_increment: [T, d] (or [s, b, d]); unique_rows: [U, 1, d] or [U, d]; inverse: [T]."""
        if unique_rows.dim() == 3:
            unique_rows = unique_rows[:, 0]
        shape = ffn_increment.shape
        out = jtok_gate(ffn_increment.reshape(-1, self.hidden_size), unique_rows, inverse, self.scale, self.eps)
        return out.view(shape)


@dataclass
class JTokMOutput:
    residual: Tensor      # dr, [T, d]: what the layer adds next to the FFN output
    aux_loss: Tensor      # scalar, already multiplied by lambda
    balance: Tensor       # n_e * sum_i P_i f_i, the aux loss without lambda (what Megatron logs for its routers)
    load: Tensor          # f_i, [n_e]: fraction of the T*K assignments per row set (for logging)


def load_balancing_loss(probs: Tensor, top_idx: Tensor, num_sets: int, coeff: float,
                        group: "torch.distributed.ProcessGroup | None" = None) -> tuple[Tensor, Tensor]:
    """Switch-style L_aux = coeff * n_e * sum_i P_i f_i (Megatron's switch_load_balancing_loss_func).

    probs: [T, n_e] routing probabilities (normalised over the n_e sets); top_idx: [T, K].
    P_i is the mean probability, f_i the fraction of the T*K assignments that chose set i (no gradient).
    group: the ranks that hold shards of one sequence (sequence parallelism): f_i and T are then counted
    over the whole sequence and this rank's share of the sum uses its own probabilities, so the shards'
    losses (and their router gradients, summed over the group) add up to the loss of the whole sequence,
    as Megatron's router does with its tp_cp group. Returns (L_aux, f) with f of the whole sequence.
    """
    counts = torch.zeros(num_sets, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(0, top_idx.reshape(-1), torch.ones(top_idx.numel(), dtype=probs.dtype, device=probs.device))
    num_tokens = probs.shape[0]
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(counts, group=group)
        num_tokens *= torch.distributed.get_world_size(group)
    frac = counts / (num_tokens * top_idx.shape[-1])
    return coeff * num_sets * torch.sum(probs.sum(dim=0) / num_tokens * frac), frac


class JTokM(nn.Module):
    """Dynamic JTok-M: routes each position over its token's n_e rows and adds a scaled residual."""

    def __init__(
        self,
        hidden_size: int,
        num_sets: int,
        top_k: int,
        num_layers: int,
        eps: float = 1e-6,
        router_norm_eps: float = 1e-6,
        scale_init: float = 1.0,
        router_init_std: float = 0.02,
        aux_loss_coeff: float = 1e-4,
        aux_prob: str = "sigmoid",
        depth_scaling: bool = True,
    ):
        super().__init__()
        if not 1 <= top_k <= num_sets:
            raise ValueError(f"JTok-M top_k={top_k} must be in [1, num_sets={num_sets}]")
        if aux_prob not in ("sigmoid", "softmax"):
            raise ValueError(f"JTok-M aux_prob={aux_prob!r}: expected 'sigmoid' or 'softmax'")
        self.hidden_size, self.num_sets, self.top_k = hidden_size, num_sets, top_k
        self.eps = eps
        self.aux_loss_coeff = aux_loss_coeff
        self.aux_prob = aux_prob
        # 1/sqrt(2 N_l): without it the hidden-state std exploded in the paper's runs.
        self.depth_factor = 1.0 / math.sqrt(2 * num_layers) if depth_scaling else 1.0
        self.router_norm = nn.RMSNorm(hidden_size, eps=router_norm_eps)
        self.router = nn.Parameter(torch.empty(hidden_size, num_sets))
        nn.init.normal_(self.router, std=router_init_std)
        self.scale = nn.Parameter(torch.full((hidden_size,), float(scale_init)))
        self.scale.jtok_scale = True    # its own LR when jtok.scale_lr_mult != 1 (training/optim.py)

    def route(self, layer_input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (top-K router logits [T, K], top-K set ids [T, K], router logits g [T, n_e]).

        The sigmoid and the renormalisation over the K happen inside ``jtokm_blend`` (fused with the blend),
        so the gradient reaches the router through the top-K logits."""
        logits = self.router_norm(layer_input) @ self.router                    # g, [T, n_e]
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)           # G = TopK(g, K)
        return top_logits, top_idx, logits

    def forward(self, layer_input: Tensor, unique_rows: Tensor, inverse: Tensor,
                sequence_group: "torch.distributed.ProcessGroup | None" = None) -> JTokMOutput:
        """layer_input: [T, d] (or [s, b, d]); unique_rows: [U, n_e, d]; inverse: [T]. sequence_group: the
        ranks holding the other shards of these sequences (sequence parallelism), for the aux loss."""
        h = layer_input.reshape(-1, self.hidden_size)
        top_logits, top_idx, logits = self.route(h)
        residual = jtokm_blend(unique_rows, inverse, top_logits, top_idx, self.scale, self.depth_factor, self.eps)
        if self.aux_prob == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits, dim=-1)
        balance, load = load_balancing_loss(probs.to(torch.promote_types(probs.dtype, torch.float32)), top_idx,
                                            self.num_sets, 1.0, group=sequence_group)
        return JTokMOutput(residual=residual.view(layer_input.shape), aux_loss=self.aux_loss_coeff * balance,
                           balance=balance, load=load.detach())
