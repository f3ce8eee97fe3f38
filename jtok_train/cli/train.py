"""jtok-train: the Hydra training app.

    jtok-train model=tiny jtok=jtokm train.train_iters=50          # one process (laptop)
    bash launch/torchrun.sh model=tiny jtok=jtokm                  # one node, several ranks
    sbatch launch/slurm/pretrain.sbatch model=tiny jtok=jtokm      # SLURM, several nodes

The configs are the package's own ``jtok_train/configs/`` (package data, in every install; ``JTOK_CONFIG_DIR``
replaces them, Hydra's ``--config-dir DIR`` adds DIR before them: ``jtok-train --config-dir DIR model=mine``).
``jtok-train OVERRIDES --cfg job`` prints the composed config and stops (Hydra's flag).

Hydra composes and validates the config once per launch:

* ``jtok-train OVERRIDES`` (one process): Hydra composes, the run directory gets ``config.yaml`` (the
  resolved config), ``command.txt`` (one line per launch) and ``.hydra/``, then training starts.
* ``jtok-train --prepare OVERRIDES`` (what the launchers run once, before torchrun/srun): the same, but it
  stops after writing the files and prints the path of ``<run_dir>/launch.env`` (shell assignments:
  JTOK_RESOLVED_CONFIG, JTOK_RUN_DIR, JTOK_CUDA_DEVICE_MAX_CONNECTIONS) on its last line.
* ``python -m jtok_train --resolved RUN_DIR/config.yaml`` (what every rank runs): no Hydra, no
  composition, no files written; the resolved YAML is checked against the schema and training starts.

``torchrun -m jtok_train OVERRIDES`` without a launcher still works: every rank composes (deterministic:
the configs use no ``${now:}``), and only rank 0 writes into the run directory.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from jtok_train.config import (
    ConfigError,
    RunConfig,
    check_override_keys,
    config_dir,
    register_configs,
    resolve_vocab_size,
    resolved,
    validate,
)
from jtok_train.data.indexed import DataFileError
from jtok_train.data.tokenizer import load_tokenizer
from jtok_train.errors import RunError
from jtok_train.testing.startup import note_process_start

RESOLVED_NAME = "config.yaml"
COMMAND_NAME = "command.txt"
LAUNCH_ENV_NAME = "launch.env"

_MODE: dict[str, Any] = {"prepare": False, "argv": None}


def _quiet_dependencies(verbose: bool) -> None:
    """Megatron logs every parameter name at INFO and warns about absent GPU-only packages: keep the
    console to our progress bar and messages unless JTOK_VERBOSE=1."""
    if verbose:
        return
    logging.getLogger("megatron").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*")


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def _env_from_slurm() -> None:
    """``srun python -m jtok_train`` (one task per GPU, no torchrun): torch.distributed's env:// needs
    RANK/WORLD_SIZE/LOCAL_RANK; the batch script exports MASTER_ADDR/MASTER_PORT."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or os.environ.get("JTOK_SLURM_RANKS") != "1":
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    os.environ["LOCAL_WORLD_SIZE"] = str(int(os.environ["WORLD_SIZE"]) // max(1, nnodes))


def _precheck(cfg: RunConfig) -> None:
    """What can be checked before any rank starts: keys, values, the world size the launcher announced
    (JTOK_WORLD_SIZE), the tokenizer's vocabulary."""
    world = int(os.environ["JTOK_WORLD_SIZE"]) if os.environ.get("JTOK_WORLD_SIZE") else None
    vocab = None
    tok = Path(str(cfg.data.tokenizer))
    if tok.is_file():
        vocab = load_tokenizer(str(tok)).vocab_size
    validate(cfg, world_size=world, tokenizer_vocab=vocab)


def _command_line() -> str:
    """The launch as the user typed it (launchers pass theirs in JTOK_LAUNCH_COMMAND), else this process's."""
    if os.environ.get("JTOK_LAUNCH_COMMAND"):
        return os.environ["JTOK_LAUNCH_COMMAND"]
    argv = _MODE.get("argv") or sys.argv
    head = [sys.executable, "-m", "jtok_train"] if argv[0].endswith("__main__.py") else [argv[0]]
    return shlex.join(head + list(argv[1:]))


def write_run_files(cfg: RunConfig) -> Path:
    """Write ``config.yaml`` (resolved), append to ``command.txt`` and write ``launch.env``; return the
    path of ``launch.env``. Called once per launch, by one process."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    res = resolved(cfg)
    tmp = run_dir / (RESOLVED_NAME + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(res))
    tmp.replace(run_dir / RESOLVED_NAME)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    where = f"cwd={shlex.quote(os.getcwd())}"
    if os.environ.get("SLURM_JOB_ID"):
        where += f" slurm_job={os.environ['SLURM_JOB_ID']} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}"
    with open(run_dir / COMMAND_NAME, "a") as f:
        f.write(f"# {stamp} {where}\n{_command_line()}\n")
    p = res.parallel
    # CUDA_DEVICE_MAX_CONNECTIONS=1 makes the GPU execute kernels in launch order over one hardware queue:
    # Megatron needs it for tensor/sequence-parallel communication overlap, but it serialises the JTok
    # exchange's side stream behind compute. Ask for it only where TP needs it.
    max_conn = "1" if p.tensor_model_parallel_size > 1 else ""
    env = {
        "JTOK_RESOLVED_CONFIG": str((run_dir / RESOLVED_NAME).resolve()),
        "JTOK_RUN_DIR": str(run_dir.resolve()),
        "JTOK_CUDA_DEVICE_MAX_CONNECTIONS": max_conn,
    }
    env_file = run_dir / LAUNCH_ENV_NAME
    env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    return env_file


def load_resolved(path: str | os.PathLike) -> DictConfig:
    """A resolved config written by :func:`write_run_files`, checked against the schema (types, keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resolved config {path} not found: run the launcher (or jtok-train --prepare) first")
    schema = OmegaConf.structured(RunConfig)
    return OmegaConf.merge(schema, OmegaConf.load(path))


def _train(cfg: DictConfig) -> None:
    # the Trainer's first import, made here so the start-up record holds it
    import megatron.core  # noqa: F401  # lazy: cost (torch + megatron.core, 5-8 s: not for --help, --prepare)

    from jtok_train.training.trainer import train  # lazy: cost (torch + megatron.core, as above)

    note_process_start()    # the test suite's timing (a no-op unless JTOK_TEST_TIMING is set)
    train(cfg)


def _guarded(fn: Any) -> None:
    """Run ``fn``; errors the user can act on print one line (no traceback) and set the exit code:
    2 for a bad config, 3 (RunError.exit_code) for checkpoints, data and non-finite losses."""
    _quiet_dependencies(os.environ.get("JTOK_VERBOSE", "0") == "1")
    try:
        fn()
    except ConfigError as e:
        print(f"jtok-train: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    except (RunError, DataFileError) as e:
        print(f"jtok-train: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 3))


def run(cfg: DictConfig) -> None:
    """The Hydra task function (composition happened in this process)."""

    def body() -> None:
        resolve_vocab_size(cfg)      # model.vocab_size=null: the tokenizer's, padded (recorded in config.yaml)
        _precheck(cfg)
        if _rank() == 0 or _MODE["prepare"]:
            env_file = write_run_files(cfg)
        if _MODE["prepare"]:
            print(env_file.resolve(), flush=True)
            return
        _train(cfg)

    _guarded(body)


def run_resolved(path: str) -> None:
    """A rank started by a launcher: the config was composed and validated once, before."""
    _guarded(lambda: _train(load_resolved(path)))


def _pop_flag(argv: list[str], name: str, takes_value: bool) -> Any:
    for i, a in enumerate(argv):
        if a == name:
            if not takes_value:
                del argv[i]
                return True
            if i + 1 >= len(argv):
                raise SystemExit(f"jtok-train: {name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if takes_value and a.startswith(name + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def main() -> None:
    if sys.argv[1:2] == ["--version"]:
        from jtok_train.compat.megatron import versions  # lazy: cost (torch, 2-5 s: only for --version)

        print(" ".join(f"{k} {v}" for k, v in versions().items()))
        return
    _env_from_slurm()
    _MODE["argv"] = list(sys.argv)
    argv = sys.argv[1:]
    resolved_path = _pop_flag(argv, "--resolved", True)
    _MODE["prepare"] = bool(_pop_flag(argv, "--prepare", False))
    if resolved_path is not None:
        if argv:
            raise SystemExit(f"jtok-train: --resolved takes no overrides (got {argv}): edit the overrides of the "
                             "launch, which composes the config once")
        run_resolved(resolved_path)
        return
    if _rank() != 0:
        # torchrun without a launcher: every rank composes the same config, only rank 0 writes files
        argv = argv + ["hydra.output_subdir=null"]
    sys.argv = sys.argv[:1] + argv
    _guarded(lambda: check_override_keys(argv))    # an unknown key: our one line and exit 2, not Hydra's advice
    register_configs()
    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(run)
    app()


if __name__ == "__main__":
    main()
