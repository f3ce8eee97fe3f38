"""jtok-train: the Hydra training app.

    jtok-train model=tiny jtok=jtokm train.train_iters=50          # one process
    torchrun --nproc-per-node 2 -m jtok_train model=tiny jtok=jtokm  # several ranks
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jtok_train.config import config_dir, register_configs


def run(cfg: DictConfig) -> None:
    from jtok_train.config import ConfigError
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
