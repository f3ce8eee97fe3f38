"""Test helpers: multi-process runs on gloo (run_distributed) and layout-independent weights."""

from jtok_train.testing.distributed import (
    DistributedTestError,
    fill_params_by_global_position,
    run_distributed,
)

__all__ = ["DistributedTestError", "fill_params_by_global_position", "run_distributed"]
