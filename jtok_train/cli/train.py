"""jtok-train: the Hydra training app.

    jtok-train model=tiny jtok=jtokm train.train_iters=50          # one process
    torchrun --nproc-per-node 2 -m jtok_train model=tiny jtok=jtokm  # several ranks
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jtok_train.config import config_dir, register_configs


def _quiet_dependencies(verbose: bool) -> None:
    """Megatron logs every parameter name at INFO and warns about absent GPU-only packages: keep the
    console to our progress bar and messages unless JTOK_VERBOSE=1."""
    import logging
    import warnings

    if verbose:
        return
    logging.getLogger("megatron").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")


def run(cfg: DictConfig) -> None:
    import os

    from jtok_train.config import ConfigError

    _quiet_dependencies(os.environ.get("JTOK_VERBOSE", "0") == "1")
    from jtok_train.training.trainer import train

    try:
        train(cfg)
    except ConfigError as e:
        print(f"jtok-train: bad config: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()
    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(run)
    app()


if __name__ == "__main__":
    main()
