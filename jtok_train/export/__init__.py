"""Hugging Face export of jtok-train checkpoints (``jtok-export``): safetensors, config.json, the tokenizer and a
trust_remote_code modeling file with JTok / JTok-M."""

from jtok_train.export.hf import MODELING_FILES, ExportError, export_checkpoint, hf_config, hf_state_dict

__all__ = ["MODELING_FILES", "ExportError", "export_checkpoint", "hf_config", "hf_state_dict"]
