"""The planner's inputs besides the config: the cluster (a preset from jtok_train/configs/cluster/ and/or
``key=value`` overrides) and ``PlanError``, raised for any invalid planner input."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf

from jtok_train.config import config_dir

__all__ = ["PlanError", "Cluster", "cluster_dir", "cluster_names", "load_cluster"]


class PlanError(ValueError):
    """A planner input is invalid; the message names it and the fix."""


@dataclass
class Cluster:
    name: str = "custom"
    gpus: int = 8
    "GPUs in the job (all ranks)."
    gpus_per_node: int = 8
    "GPUs per node (an all-to-all reaches gpus_per_node - 1 peers over the intra-node link)."
    memory_gib: float = 80.0
    "Memory per GPU, GiB."
    intra_node_GBps: float = 450.0
    "Intra-node bandwidth per GPU per direction, GB/s (NVLink)."
    inter_node_GBps: float = 50.0
    "Inter-node bandwidth per GPU per direction, GB/s (e.g. 400 Gb/s InfiniBand = 50 GB/s)."
    peak_tflops: float = 989.0
    "Dense peak per GPU in the training precision, TFLOP/s."
    mfu: float = 0.4
    "Assumed model FLOPs utilisation of the backbone."
    hbm_GBps: float = 3350.0
    "Memory bandwidth per GPU, GB/s (table optimizer traffic)."
    latency_us: float = 15.0
    "Fixed cost of one all-to-all, microseconds."


def cluster_dir() -> Path:
    return config_dir() / "cluster"


def cluster_names() -> list[str]:
    d = cluster_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_cluster(name: Optional[str], overrides: Sequence[str] = ()) -> Cluster:
    """A preset from jtok_train/configs/cluster/<name>.yaml (or the defaults when name is None), then
    ``key=value`` overrides (keys without the ``cluster.`` prefix). Unknown keys and bad values raise PlanError."""
    known = {f.name for f in fields(Cluster)}
    data: dict[str, Any] = {}
    if name is not None:
        path = cluster_dir() / f"{name}.yaml"
        if not path.is_file():
            raise PlanError(f"cluster={name!r} is not a preset: choose one of {cluster_names()} ({cluster_dir()}) "
                            "or describe it with cluster.gpus=... cluster.memory_gib=...")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
        data.setdefault("name", name)
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq:
            raise PlanError(f"cluster override {o!r} needs a value: cluster.{key}=...")
        data[key] = yaml.safe_load(value) if value else value
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise PlanError(f"unknown cluster key cluster.{key}" + (f" (did you mean cluster.{hint[0]}?)" if hint else "")
                            + f"; keys: {sorted(known)}")
    c = Cluster(**{k: v for k, v in data.items()})
    for f in fields(Cluster):
        v = getattr(c, f.name)
        if f.name == "name":
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise PlanError(f"cluster.{f.name}={v!r} is invalid: must be a positive number")
    if c.mfu > 1:
        raise PlanError(f"cluster.mfu={c.mfu} is invalid: a fraction of the peak in (0, 1]")
    c.gpus, c.gpus_per_node = int(c.gpus), int(c.gpus_per_node)
    if c.gpus % c.gpus_per_node and c.gpus > c.gpus_per_node:
        raise PlanError(f"cluster.gpus={c.gpus} is not a multiple of cluster.gpus_per_node={c.gpus_per_node}")
    return c

