"""Export a jtok-train checkpoint to a Hugging Face directory (trust_remote_code).

    DIR/config.json             JTokConfig (model_type "jtok", auto_map -> the two files below)
    DIR/configuration_jtok.py   the config class          (copied from jtok_train/export/)
    DIR/modeling_jtok.py        the model: backbone + JTok / JTok-M, KV cache, generate()
    DIR/model.safetensors       the weights; the JTok tables as one tensor ``model.token_table`` [V, L, n_e, d]
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json   the checkpoint's tokenizer
    DIR/generation_config.json  eos/pad = the end-of-document id

The checkpoint is loaded as jtok-generate loads it (any saved layout, rebuilt at one rank). Names map from
Megatron's (``decoder.layers.l.self_attention.linear_qkv.weight`` -> ``model.layers.l.self_attn.qkv_proj.weight``,
...), tensors are copied unchanged (fused QKV and gate/up layouts kept; modeling_jtok.py documents them).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from jtok_train.config import RunConfig
from jtok_train.data.tokenizer import EOD_TOKEN, load_tokenizer
from jtok_train.errors import CheckpointError
from jtok_train.inference import load_for_inference
from jtok_train.inference.loading import check_tokenizer

__all__ = ["ExportError", "hf_config", "hf_state_dict", "export_checkpoint", "MODELING_FILES"]

HERE = Path(__file__).resolve().parent
MODELING_FILES = ("configuration_jtok.py", "modeling_jtok.py")


class ExportError(ValueError):
    """A model the export does not cover; the message names the setting."""


def hf_config(cfg: RunConfig, tokenizer: Any) -> dict[str, Any]:
    """config.json of the HF model for a run config (raises ExportError for what modeling_jtok.py lacks)."""
    m, j = cfg.model, cfg.jtok
    if m.normalization != "RMSNorm":
        raise ExportError(f"model.normalization={m.normalization}: the export covers RMSNorm models only")
    if m.position_embedding_type != "rope":
        raise ExportError(f"model.position_embedding_type={m.position_embedding_type}: the export covers rope only")
    if m.transformer_impl != "local":
        raise ExportError(f"model.transformer_impl={m.transformer_impl}: the export reads Megatron's local spec "
                          "weights (train with model.transformer_impl=local)")
    moe = m.num_experts is not None
    return {
        "architectures": ["JTokForCausalLM"],
        "model_type": "jtok",
        "auto_map": {"AutoConfig": "configuration_jtok.JTokConfig",
                     "AutoModelForCausalLM": "modeling_jtok.JTokForCausalLM"},
        "vocab_size": int(m.vocab_size),
        "hidden_size": int(m.hidden_size),
        "num_hidden_layers": int(m.num_layers),
        "num_attention_heads": int(m.num_attention_heads),
        "num_key_value_heads": int(m.num_query_groups or m.num_attention_heads),
        "head_dim": int(m.hidden_size // m.num_attention_heads),
        "intermediate_size": int(m.ffn_hidden_size),
        "gated_linear_unit": bool(m.gated_linear_unit),
        "rms_norm_eps": float(m.layernorm_epsilon),
        "rope_theta": float(m.rotary_base),
        "max_position_embeddings": int(m.seq_length),
        "num_experts": int(m.num_experts) if moe else None,
        "num_experts_per_tok": int(m.moe_router_topk),
        "moe_intermediate_size": int(m.moe_ffn_hidden_size) if moe else None,
        "shared_expert_intermediate_size": (int(m.moe_shared_expert_intermediate_size)
                                            if moe and m.moe_shared_expert_intermediate_size else None),
        "moe_router_score_function": str(m.moe_router_score_function),
        "moe_router_pre_softmax": False,
        "moe_router_topk_scaling_factor": None,
        "jtok_variant": str(j.variant),
        "jtok_num_sets": int(j.num_sets) if j.variant != "none" else 1,
        "jtok_top_k": int(j.top_k) if j.variant != "none" else 1,
        "jtok_eps": float(j.eps),
        "jtok_router_norm_eps": float(j.router_norm_eps),
        "jtok_depth_scaling": bool(j.depth_scaling),
        "tie_word_embeddings": not bool(m.untie_embeddings_and_output_weights),
        "bos_token_id": int(tokenizer.eod),
        "eos_token_id": int(tokenizer.eod),
        "pad_token_id": int(tokenizer.eod),
        "torch_dtype": "bfloat16" if cfg.train.precision == "bf16" else "float32",
    }


_LAYER_MAP = [
    (r"input_layernorm\.weight", "input_layernorm.weight"),
    (r"self_attention\.linear_qkv\.weight", "self_attn.qkv_proj.weight"),
    (r"self_attention\.linear_proj\.weight", "self_attn.o_proj.weight"),
    (r"pre_mlp_layernorm\.weight", "post_attention_layernorm.weight"),
    (r"mlp\.linear_fc1\.weight", "mlp.gate_up_proj.weight"),
    (r"mlp\.linear_fc2\.weight", "mlp.down_proj.weight"),
    (r"mlp\.router\.weight", "mlp.router"),
    (r"mlp\.experts\.local_experts\.(\d+)\.linear_fc1\.weight", r"mlp.experts.\1.gate_up_proj.weight"),
    (r"mlp\.experts\.local_experts\.(\d+)\.linear_fc2\.weight", r"mlp.experts.\1.down_proj.weight"),
    (r"mlp\.shared_experts\.linear_fc1\.weight", "mlp.shared_experts.gate_up_proj.weight"),
    (r"mlp\.shared_experts\.linear_fc2\.weight", "mlp.shared_experts.down_proj.weight"),
    (r"jtok\.scale", "jtok.scale"),
    (r"jtok\.router", "jtok.router"),
    (r"jtok\.router_norm\.weight", "jtok.router_norm.weight"),
]


def hf_state_dict(model: Any, table: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Megatron (JTok)GPTModel state dict -> the HF model's names; ``table`` [V, L, n_e, d] in token order."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state") or not isinstance(t, torch.Tensor) or name.startswith("token_table"):
            continue
        if name.startswith("rotary_pos_emb."):
            continue                                  # inv_freq: recomputed from rope_theta
        if name == "embedding.word_embeddings.weight":
            key = "model.embed_tokens.weight"
        elif name == "decoder.final_layernorm.weight":
            key = "model.norm.weight"
        elif name == "output_layer.weight":
            key = "lm_head.weight"
        else:
            m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
            key = None
            if m:
                for pattern, repl in _LAYER_MAP:
                    if re.fullmatch(pattern, m.group(2)):
                        key = f"model.layers.{m.group(1)}." + re.sub(pattern, repl, m.group(2))
                        break
            if key is None:
                raise ExportError(f"checkpoint tensor {name} has no place in the Hugging Face model: the export "
                                  "does not cover this model's layout yet")
        out[key] = t.detach().cpu().contiguous()
    if table is not None:
        out["model.token_table"] = table.detach().cpu().contiguous()
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, tokenizer_path: str = "",
                      verify: bool = True, overwrite: bool = False) -> Path:
    """Write the HF directory ``out`` for ``checkpoint`` (see module doc); returns ``out``."""
    # lazy: cost (safetensors.torch: only an export writes weights)
    from safetensors.torch import save_file

    # lazy: cost (transformers, ~1 s: only an export writes its tokenizer files)
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"out={out} exists and is not empty: pick a new directory or pass overwrite=true")
    loaded = load_for_inference(checkpoint, tables="host", device="cpu", verify_checksums=verify)
    tok_path = tokenizer_path or str(loaded.cfg.data.tokenizer)
    if not Path(tok_path).is_file():
        raise CheckpointError(f"tokenizer {tok_path} (the checkpoint's data.tokenizer) does not exist: pass "
                              "tokenizer=PATH/tokenizer.json")
    tok = load_tokenizer(tok_path)
    check_tokenizer(tok, loaded.cfg, given=bool(tokenizer_path))
    config = hf_config(loaded.cfg, tok)
    config["jtok_train"] = {"checkpoint": str(loaded.path), "step": loaded.meta.get("step"),
                            "model": loaded.cfg.model.name}
    provider = loaded.provider
    table = provider.table if provider is not None else None
    state = hf_state_dict(loaded.unwrapped, table)
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in MODELING_FILES:
        shutil.copyfile(HERE / f, out / f)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=tok_path, eos_token=EOD_TOKEN, bos_token=EOD_TOKEN,
                                     pad_token=EOD_TOKEN, unk_token=None)
    hf_tok.model_max_length = int(loaded.cfg.model.seq_length)
    hf_tok.save_pretrained(str(out))
    gen = {"bos_token_id": tok.eod, "eos_token_id": tok.eod, "pad_token_id": tok.eod, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out
