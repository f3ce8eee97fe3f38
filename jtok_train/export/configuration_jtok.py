"""Hugging Face config of a jtok-train model (Megatron-Core GPT backbone, dense or MoE, + JTok / JTok-M).

Written by ``jtok-export``; loaded with ``AutoConfig.from_pretrained(DIR, trust_remote_code=True)``.
This file and modeling_jtok.py need only torch and transformers.
"""

from transformers import PretrainedConfig


class JTokConfig(PretrainedConfig):
    model_type = "jtok"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 512,
        gated_linear_unit: bool = True,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 256,
        num_experts: int | None = None,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int | None = None,
        shared_expert_intermediate_size: int | None = None,
        moe_router_score_function: str = "softmax",
        moe_router_pre_softmax: bool = False,
        moe_router_topk_scaling_factor: float | None = None,
        jtok_variant: str = "none",
        jtok_num_sets: int = 1,
        jtok_top_k: int = 1,
        jtok_eps: float = 1e-6,
        jtok_router_norm_eps: float = 1e-6,
        jtok_depth_scaling: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.gated_linear_unit = gated_linear_unit
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.moe_router_topk_scaling_factor = moe_router_topk_scaling_factor
        self.jtok_variant = jtok_variant
        self.jtok_num_sets = jtok_num_sets
        self.jtok_top_k = jtok_top_k
        self.jtok_eps = jtok_eps
        self.jtok_router_norm_eps = jtok_router_norm_eps
        self.jtok_depth_scaling = jtok_depth_scaling
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
