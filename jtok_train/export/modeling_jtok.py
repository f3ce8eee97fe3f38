"""Hugging Face model of a jtok-train checkpoint: Megatron-Core's GPT (pre-norm RMSNorm, RoPE, SwiGLU, dense
MLP or MoE with a shared expert) with JTok / JTok-M (arXiv:2602.00800). Written by ``jtok-export``:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).generate(...)

Per layer, with h the layer input and x the token id at a position (PAPER.md's equations):

    h~ = h + Attn(RMSNorm(h));  dm = FFN(RMSNorm(h~))
    JTok    h' = h~ + dm * (1 + s * normalize(T[x, l, 0]))
    JTok-M  g = RMSNorm_r(h) @ R;  G = TopK(g, K);  w_i = sigmoid(g_i) / sum_{j in G} sigmoid(g_j)
            h' = h~ + dm + s / sqrt(2 L) * normalize(sum_{i in G} w_i T[x, l, i])
    normalize(u) = u / (||u||_2 + eps)

Weights (model.safetensors) keep Megatron's fused layouts:
  model.token_table                    [V, L, n_e, d]  every layer's JTok rows of token x in row x (n_e = 1 for JTok)
  model.layers.l.self_attn.qkv_proj    [(n_q + 2 n_kv) * hd, d]  per key/value group: its query heads, key, value
  model.layers.l.mlp.gate_up_proj      [2 f, d]  SwiGLU: first half gate (silu), second half up
  model.layers.l.mlp.router            [E, d] (MoE), mlp.experts.e.*, mlp.shared_experts.*
  model.layers.l.jtok.scale [d], jtok.router [d, n_e], jtok.router_norm.weight [d] (JTok-M)
Needs only torch and transformers; attention is computed eagerly in fp32 softmax, as Megatron's local spec.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_jtok import JTokConfig


def _l2_normalize(u: torch.Tensor, eps: float) -> torch.Tensor:
    return u / (torch.linalg.vector_norm(u, dim=-1, keepdim=True) + eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class JTokRotary(nn.Module):
    """Megatron's RoPE (non-interleaved). The frequencies are computed per call, not kept in a buffer: a
    non-persistent buffer would be left unset when from_pretrained builds the model on the meta device."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, s] -> cos, sin [b, 1, s, hd]."""
        hd = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=positions.device) / hd))
        freqs = positions.float()[..., None] * inv_freq                # [b, s, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


class JTokAttention(nn.Module):
    def __init__(self, config: JTokConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nq, self.nkv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, (self.nq + 2 * self.nkv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nq * self.hd, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: Optional[Cache]):
        b, s, _ = x.shape
        per_group = self.nq // self.nkv
        qkv = self.qkv_proj(x).view(b, s, self.nkv, (per_group + 2) * self.hd)
        q, k, v = torch.split(qkv, [per_group * self.hd, self.hd, self.hd], dim=-1)
        q = q.reshape(b, s, self.nq, self.hd).transpose(1, 2)           # [b, nq, s, hd]
        k, v = k.transpose(1, 2), v.transpose(1, 2)                      # [b, nkv, s, hd]
        q = q * cos.to(q.dtype) + _rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + _rotate_half(k) * sin.to(k.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if per_group > 1:
            k = k.repeat_interleave(per_group, dim=1)
            v = v.repeat_interleave(per_group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hd)
        scores = scores.float().masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.nq * self.hd)
        return self.o_proj(out)


class JTokMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, gated: bool):
        super().__init__()
        self.gated = gated
        self.gate_up_proj = nn.Linear(hidden, inner * (2 if gated else 1), bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        h = self.gate_up_proj(x)
        if self.gated:
            gate, up = torch.chunk(h, 2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.down_proj(h)


class JTokMoE(nn.Module):
    """Megatron's MoE layer without token dropping: top-k routed experts (+ a shared expert)."""

    def __init__(self, config: JTokConfig):
        super().__init__()
        self.k = config.num_experts_per_tok
        self.score = config.moe_router_score_function
        self.pre_softmax = config.moe_router_pre_softmax
        self.scaling = config.moe_router_topk_scaling_factor
        self.router = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.experts = nn.ModuleList(JTokMLP(config.hidden_size, config.moe_intermediate_size,
                                             config.gated_linear_unit) for _ in range(config.num_experts))
        self.shared_experts = (JTokMLP(config.hidden_size, config.shared_expert_intermediate_size,
                                       config.gated_linear_unit) if config.shared_expert_intermediate_size else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.router)
        if self.score == "softmax":
            if self.pre_softmax:
                probs, idx = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits), self.k)
            else:
                top, idx = torch.topk(logits, self.k, dim=-1)
                probs = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
        else:
            scores = torch.sigmoid(logits.float()).type_as(logits)
            probs, idx = torch.topk(scores, self.k, dim=-1)
            if self.k > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scaling:
            probs = probs * self.scaling
        return probs, idx

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, idx = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(flat[tok]) * probs[tok, slot, None].to(flat.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


class JTokModulation(nn.Module):
    """JTok (variant "jtok": gate on the FFN increment) or JTok-M ("jtokm": routed residual)."""

    def __init__(self, config: JTokConfig):
        super().__init__()
        self.variant, self.eps, self.k = config.jtok_variant, config.jtok_eps, config.jtok_top_k
        d = config.hidden_size
        self.scale = nn.Parameter(torch.zeros(d))
        if self.variant == "jtokm":
            self.router_norm = nn.RMSNorm(d, eps=config.jtok_router_norm_eps)
            self.router = nn.Parameter(torch.empty(d, config.jtok_num_sets))
            self.depth = 1.0 / math.sqrt(2 * config.num_hidden_layers) if config.jtok_depth_scaling else 1.0

    def gate(self, dm: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """JTok: dm * (1 + s * normalize(row)); rows [b, s, 1, d]."""
        return dm * (1.0 + self.scale * _l2_normalize(rows[..., 0, :], self.eps)).to(dm.dtype)

    def residual(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """JTok-M: s / sqrt(2 L) * normalize(sum_{i in TopK} w_i row_i); h the layer input, rows [b, s, n_e, d]."""
        logits = self.router_norm(h) @ self.router
        top, idx = torch.topk(logits, self.k, dim=-1)
        w = torch.sigmoid(top)
        w = w / w.sum(dim=-1, keepdim=True)
        picked = torch.gather(rows, -2, idx[..., None].expand(*idx.shape, rows.shape[-1]))   # [b, s, K, d]
        e = torch.einsum("bsk,bskd->bsd", w.to(rows.dtype), picked)
        return ((self.depth * self.scale) * _l2_normalize(e, self.eps)).to(h.dtype)


class JTokDecoderLayer(nn.Module):
    def __init__(self, config: JTokConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = JTokAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = (JTokMoE(config) if config.num_experts else
                    JTokMLP(config.hidden_size, config.intermediate_size, config.gated_linear_unit))
        self.jtok = JTokModulation(config) if config.jtok_variant != "none" else None

    def forward(self, h, rows, cos, sin, mask, cache):
        dr = self.jtok.residual(h, rows) if self.jtok is not None and self.jtok.variant == "jtokm" else None
        h_tilde = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        dm = self.mlp(self.post_attention_layernorm(h_tilde))
        if self.jtok is not None and self.jtok.variant == "jtok":
            dm = self.jtok.gate(dm, rows)
        if dr is not None:
            h_tilde = h_tilde + dr           # Megatron's order: (h~ + dr) + dm
        return h_tilde + dm


class JTokPreTrainedModel(PreTrainedModel):
    config_class = JTokConfig
    base_model_prefix = "model"
    _no_split_modules = ["JTokDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, JTokMoE):
            nn.init.normal_(module.router, std=std)
        elif isinstance(module, JTokModulation) and module.variant == "jtokm":
            nn.init.normal_(module.router, std=std)
        elif isinstance(module, JTokModel) and module.token_table is not None:
            nn.init.normal_(module.token_table, std=std)


class JTokModel(JTokPreTrainedModel):
    def __init__(self, config: JTokConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(JTokDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = JTokRotary(config.head_dim, config.rope_theta)
        self.token_table = (nn.Parameter(torch.empty(config.vocab_size, config.num_hidden_layers,
                                                     config.jtok_num_sets, config.hidden_size))
                            if config.jtok_variant != "none" else None)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        b, s = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=input_ids.device)[None].expand(b, s)
        cos, sin = self.rotary(position_ids)
        # causal (query i sees keys <= past + i), and padding from attention_mask [b, past + s]
        keys = torch.arange(past + s, device=input_ids.device)
        mask = (keys[None, :] <= (past + torch.arange(s, device=input_ids.device))[:, None])[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -(past + s):].bool()
        h = self.embed_tokens(input_ids)
        rows = self.token_table[input_ids] if self.token_table is not None else None   # [b, s, L, n_e, d]
        for i, layer in enumerate(self.layers):
            h = layer(h, rows[:, :, i] if rows is not None else None, cos, sin, mask, past_key_values)
        return self.norm(h)


class JTokForCausalLM(JTokPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JTokConfig):
        super().__init__(config)
        self.model = JTokModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, return_dict=None, **kwargs):
        # transformers >= 5 passes the KV cache as `cache`, earlier releases as `past_key_values`
        kv = cache if cache is not None else past_key_values
        if use_cache and kv is None:
            kv = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, kv if use_cache else None)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{field: kv if use_cache else None})
