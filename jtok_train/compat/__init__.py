"""What lets Megatron-Core run on CPU + gloo; the only place in jtok_train that may special-case CPU."""

from jtok_train.compat.cpu import (
    destroy_model_parallel,
    device,
    init_distributed,
    init_model_parallel,
    install_cpu_compat,
    is_cpu_compat_installed,
)

__all__ = [
    "destroy_model_parallel",
    "device",
    "init_distributed",
    "init_model_parallel",
    "install_cpu_compat",
    "is_cpu_compat_installed",
]
