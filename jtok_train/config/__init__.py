"""Config schemas, their Hydra registration, and composition outside a Hydra app (tests, jtok-plan)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
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
    validate,
)

__all__ = [
    "ConfigError", "DataConfig", "EvalConfig", "JTokConfig", "LoggingConfig", "ModelConfig", "ParallelConfig",
    "RunConfig",
    "TrainConfig", "validate", "config_dir", "register_configs", "compose",
]


def config_dir() -> Path:
    """The Hydra config directory: $JTOK_CONFIG_DIR, else the repository's ``configs/``."""
    env = os.environ.get("JTOK_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"no Hydra configs at {path}: install jtok-train from its repository (pip install -e .) "
            "or point JTOK_CONFIG_DIR at a copy of its configs/ directory"
        )
    return path


def register_configs() -> None:
    """Register the schema so that every YAML in configs/ is checked against the dataclasses."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the config as ``jtok-train`` would, without starting a Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return cfg


def resolved(cfg: Any) -> DictConfig:
    """The config with interpolations resolved and the ``hydra`` node dropped."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    c.pop("hydra", None)
    return c
