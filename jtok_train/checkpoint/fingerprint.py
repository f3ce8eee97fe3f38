"""Whether a checkpoint fits the current run: the data fingerprint (what determines the sample order) and the
model config (the sections that define the parameters)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from jtok_train.config import RunConfig
from jtok_train.config.schema import JTokConfig, ModelConfig
from jtok_train.errors import CheckpointError

__all__ = ["MODEL_SECTIONS", "NOT_MODEL_KEYS", "data_fingerprint", "config_differences", "check_compatible"]

# Config sections that define the model's parameters: a checkpoint only loads into the same values.
MODEL_SECTIONS = ("model", "jtok")
# Training hyperparameters inside the model sections: they may change on resume.
NOT_MODEL_KEYS = {"jtok.lr_mult", "jtok.weight_decay", "jtok.table_optimizer", "jtok.aux_loss_coeff",
                  "model.moe_aux_loss_coeff",
                  # activation recompute changes memory and time, not the parameters: switch it on resume
                  "model.recompute_granularity", "model.recompute_method", "model.recompute_num_layers",
                  "model.recompute_modules"}


def data_fingerprint(cfg: RunConfig, tokenizer_sha256: str) -> str:
    """sha256 of what determines the sample order: each dataset's build fingerprint (its manifest.json, else
    the .idx/.bin sizes and the .idx sha256), the blend weights, split, sequence length, seed and tokenizer."""
    parts: list[Any] = []
    for prefix in cfg.data.prefixes:
        prefix = str(prefix)
        prefix = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
        manifest = Path(prefix).parent / "manifest.json"
        entry: Any = None
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text())
                if m.get("prefix") == Path(prefix).name and m.get("fingerprint"):
                    entry = ["manifest", m["fingerprint"]]
            except (ValueError, OSError):
                entry = None
        if entry is None:
            idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
            entry = ["files", idx.stat().st_size if idx.is_file() else None,
                     bin_.stat().st_size if bin_.is_file() else None,
                     hashlib.sha256(idx.read_bytes()).hexdigest() if idx.is_file() else None]
        parts.append([Path(prefix).name, entry])
    d, t = cfg.data, cfg.train
    blob = {"datasets": parts, "weights": list(d.weights) if d.weights is not None else None, "split": d.split,
            "seq_length": cfg.model.seq_length, "seed": t.seed, "tokenizer_sha256": tokenizer_sha256}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _schema_defaults(sec: str) -> dict[str, Any]:
    node = {"model": ModelConfig, "jtok": JTokConfig}.get(sec)
    return _flat(OmegaConf.to_container(OmegaConf.structured(node)), f"{sec}.") if node else {}


def config_differences(saved_yaml: str, cfg: RunConfig, sections: tuple[str, ...] = MODEL_SECTIONS) -> list[str]:
    """``key: saved -> now`` for every differing key of the given sections (NOT_MODEL_KEYS aside). A key the
    saved config lacks (a checkpoint from before the key existed) counts as the schema's default: a key is
    added with the default that keeps the earlier behaviour."""
    saved = OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = []
    for sec in sections:
        a, b = _flat(saved.get(sec) or {}, f"{sec}."), _flat(now.get(sec) or {}, f"{sec}.")
        a = {**{k: v for k, v in _schema_defaults(sec).items() if k in b}, **a}
        for key in sorted(set(a) | set(b)):
            if key not in NOT_MODEL_KEYS and a.get(key, "<absent>") != b.get(key, "<absent>"):
                diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


def check_compatible(path: Path, meta: dict, cfg: RunConfig, data_fp: str | None) -> None:
    """Raise CheckpointError when the checkpoint's model config or data differ from ``cfg``."""
    diffs = config_differences(meta["config"], cfg)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointError(f"checkpoint {path} is from a different model config: {'; '.join(diffs[:3])}{more}; "
                              "use the checkpoint's config or a fresh train.run_dir")
    saved_fp = meta.get("data_fingerprint")
    if data_fp and saved_fp and saved_fp != data_fp and not cfg.train.ignore_data_change:
        raise CheckpointError(f"checkpoint {path} was trained on different data (fingerprint {saved_fp[:12]} != "
                              f"{data_fp[:12]}: datasets, blend, split, seq_length, seed or tokenizer changed), so "
                              "the sample order would not continue; set train.ignore_data_change=true to resume "
                              "anyway")
