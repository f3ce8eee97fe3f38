"""Config schemas, their Hydra registration, and composition outside a Hydra app (tests, jtok-plan)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from jtok_train.config.schema import (
    ConfigError,
    DataConfig,
    EvalConfig,
    JTokConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    check_override_keys,
    validate,
)
from jtok_train.data.tokenizer import load_tokenizer, padded_vocab_size

__all__ = [
    "ConfigError", "DataConfig", "EvalConfig", "JTokConfig", "LoggingConfig", "ModelConfig", "ParallelConfig",
    "RunConfig",
    "TrainConfig", "validate", "config_dir", "register_configs", "compose", "resolve_vocab_size",
    "expert_tensor_parallel_size", "check_override_keys",
]


def config_dir() -> Path:
    """The Hydra config directory: $JTOK_CONFIG_DIR, else the package's own ``jtok_train/configs/`` (package
    data: in the wheel, and in place in an editable install). To add configs rather than replace them all, pass
    Hydra's ``--config-dir DIR`` to jtok-train: DIR is searched first, the package's configs after it."""
    env = os.environ.get("JTOK_CONFIG_DIR")
    if env:
        path = Path(env)
    else:
        # pip unpacks wheels, so the package's data is a real directory (Hydra reads a directory)
        path = Path(str(files("jtok_train") / "configs"))
    if not (path / "config.yaml").is_file():
        where = f"JTOK_CONFIG_DIR={env}" if env else "the installed jtok_train package"
        raise FileNotFoundError(
            f"no Hydra configs at {path} ({where}): point JTOK_CONFIG_DIR at a directory laid out like "
            "jtok_train/configs/ (config.yaml, model/, jtok/, ...), or reinstall jtok-train"
        )
    return path


def register_configs() -> None:
    """Register the schema so that every YAML in jtok_train/configs/ is checked against the dataclasses."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the config as ``jtok-train`` would, without starting a Hydra app."""
    check_override_keys(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    resolve_vocab_size(cfg)
    return cfg


def resolve_vocab_size(cfg: RunConfig) -> None:
    """``model.vocab_size=null``: set it to the tokenizer's vocabulary padded like Megatron's
    ``make_vocab_size_divisible_by`` (128 x TP), in place. A set value is left as it is (validate checks it
    covers the tokenizer). Part of composing a config (``compose``, ``jtok-train``)."""
    if OmegaConf.select(cfg, "model.vocab_size", default=0) is not None:
        return
    tok = Path(str(OmegaConf.select(cfg, "data.tokenizer", default="")))
    if not tok.is_file():
        raise ConfigError(f"model.vocab_size=null takes the tokenizer's vocabulary, but data.tokenizer={tok} is not a "
                          "file: build the data first (jtok-data build) or set model.vocab_size")
    tp = int(OmegaConf.select(cfg, "parallel.tensor_model_parallel_size", default=1) or 1)
    cfg.model.vocab_size = padded_vocab_size(load_tokenizer(str(tok)).vocab_size, 128, tp)


def resolved(cfg: RunConfig) -> DictConfig:
    """The config with interpolations resolved and the ``hydra`` node dropped."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    c.pop("hydra", None)
    return c
