#!/usr/bin/env bash
# One node, several ranks: compose + validate the config once, then torchrun starts the ranks from it.
#
#   bash launch/torchrun.sh model=moe_3.2b_a0.5b jtok=jtokm train.run_dir=runs/moe3b     # all GPUs of the node
#   bash launch/torchrun.sh --nproc-per-node 2 model=tiny parallel.backend=gloo            # 2 CPU ranks
#   bash launch/torchrun.sh --dry-run model=tiny                                           # print, run nothing
#
# Options (before the Hydra overrides): --nproc-per-node N (default: the GPUs nvidia-smi lists, else
# $NPROC_PER_NODE, else 1), --master-port P (default: torchrun --standalone picks a free port), --dry-run.
# Environment: JTOK_PYTHON (interpreter; default .venv/bin/python of this checkout if present, else python3).
#
# What it does: `python -m jtok_train --prepare OVERRIDES` composes the config with Hydra, validates it for
# the world size, writes <run_dir>/config.yaml (resolved), command.txt and launch.env; every rank then runs
# `python -m jtok_train --resolved <run_dir>/config.yaml` and never composes again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${JTOK_PYTHON:-}" ]; then PY=$JTOK_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi

NPROC=${NPROC_PER_NODE:-}
PORT=${MASTER_PORT:-}
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) NPROC=$2; shift 2 ;;
    --nproc-per-node=*) NPROC=${1#*=}; shift ;;
    --master-port|--master_port) PORT=$2; shift 2 ;;
    --master-port=*) PORT=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ -z "$NPROC" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | grep -c '^GPU')
  else
    NPROC=1
  fi
fi

if [ -n "$PORT" ]; then RDZV=(--master-port "$PORT"); else RDZV=(--standalone); fi
TORCHRUN=("$PY" -m torch.distributed.run "${RDZV[@]}" --nnodes 1 --nproc-per-node "$NPROC")

if [ "$DRY" = 1 ]; then
  echo "JTOK_WORLD_SIZE=$NPROC $PY -m jtok_train --prepare $*"
  echo "${TORCHRUN[*]} -m jtok_train --resolved <run_dir>/config.yaml"
  exit 0
fi

export JTOK_WORLD_SIZE=$NPROC
JTOK_LAUNCH_COMMAND="bash launch/torchrun.sh --nproc-per-node $NPROC $(printf '%q ' "$@")"
export JTOK_LAUNCH_COMMAND
ENV_FILE=$("$PY" -m jtok_train --prepare "$@" | tail -n 1)
# shellcheck disable=SC1090
source "$ENV_FILE"
unset JTOK_LAUNCH_COMMAND
if [ -n "${JTOK_CUDA_DEVICE_MAX_CONNECTIONS:-}" ] && [ -z "${CUDA_DEVICE_MAX_CONNECTIONS:-}" ]; then
  export CUDA_DEVICE_MAX_CONNECTIONS=$JTOK_CUDA_DEVICE_MAX_CONNECTIONS
fi
# torch threads per rank: the trainer sets cores / local ranks; keep OpenMP from oversubscribing meanwhile
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${TORCHRUN[@]}" -m jtok_train --resolved "$JTOK_RESOLVED_CONFIG"
