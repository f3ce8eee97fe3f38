#!/usr/bin/env bash
# Submit launch/slurm/pretrain.sbatch with the job's shape from the command line.
#
#   bash launch/slurm/submit.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 -- \
#        model=moe_17b_a2b jtok=jtokm train.run_dir=runs/moe17b
#   bash launch/slurm/submit.sh --dry-run --nodes 2 -- model=tiny      # print the sbatch script, submit nothing
#
# Options (defaults in brackets):
#   --nodes N [1]            --gpus-per-node G [8] (0: CPU nodes, no GPU request)
#   --nproc-per-node P [G, or 1 with G=0]           --cpus-per-task C [8 per GPU, or 2 with G=0]
#   --partition P [cluster default]   --account A   --qos Q   --time T [24:00:00]   --job-name J [jtok]
#   --signal-lead S [300]    seconds of warning (SIGUSR1 to the batch script) before the time limit
#   --output PATH [slurm-%x-%j.out]   --launcher torchrun|srun [torchrun]   --exclusive   --dry-run
# Everything after `--` (or after the options) is Hydra overrides, passed to the script as its arguments
# (SLURM keeps them for requeued starts).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TEMPLATE=$ROOT/launch/slurm/pretrain.sbatch

NODES=1; GPUS=8; NPROC=""; CPUS=""; PARTITION=""; ACCOUNT=""; QOS=""; TIME=24:00:00; NAME=jtok; LEAD=300
OUTPUT="slurm-%x-%j.out"; LAUNCHER=torchrun; EXCLUSIVE=0; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --gpus-per-node) GPUS=$2; shift 2 ;;
    --nproc-per-node) NPROC=$2; shift 2 ;;
    --cpus-per-task) CPUS=$2; shift 2 ;;
    --partition|-p) PARTITION=$2; shift 2 ;;
    --account|-A) ACCOUNT=$2; shift 2 ;;
    --qos) QOS=$2; shift 2 ;;
    --time|-t) TIME=$2; shift 2 ;;
    --job-name|-J) NAME=$2; shift 2 ;;
    --signal-lead) LEAD=$2; shift 2 ;;
    --output|-o) OUTPUT=$2; shift 2 ;;
    --launcher) LAUNCHER=$2; shift 2 ;;
    --exclusive) EXCLUSIVE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    --*) echo "submit.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ -n "$NPROC" ] || NPROC=$(( GPUS > 0 ? GPUS : 1 ))
[ -n "$CPUS" ] || CPUS=$(( GPUS > 0 ? 8 * GPUS : 2 ))
case "$LAUNCHER" in torchrun) TASKS=1 ;; srun) TASKS=$NPROC; CPUS=$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 )) ;;
  *) echo "submit.sh: --launcher must be torchrun or srun" >&2; exit 2 ;; esac

DIRECTIVES="#SBATCH --job-name=$NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS
#SBATCH --cpus-per-task=$CPUS
#SBATCH --time=$TIME
#SBATCH --signal=B:USR1@$LEAD
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$OUTPUT"
[ "$GPUS" -gt 0 ] && DIRECTIVES+=$'\n'"#SBATCH --gpus-per-node=$GPUS"
[ -n "$PARTITION" ] && DIRECTIVES+=$'\n'"#SBATCH --partition=$PARTITION"
[ -n "$ACCOUNT" ] && DIRECTIVES+=$'\n'"#SBATCH --account=$ACCOUNT"
[ -n "$QOS" ] && DIRECTIVES+=$'\n'"#SBATCH --qos=$QOS"
[ "$EXCLUSIVE" = 1 ] && DIRECTIVES+=$'\n'"#SBATCH --exclusive"
SETTINGS="export JTOK_ROOT=\${JTOK_ROOT:-$(printf '%q' "$ROOT")}
export NPROC_PER_NODE=\${NPROC_PER_NODE:-$NPROC}
export LAUNCHER=\${LAUNCHER:-$LAUNCHER}"

# the template with its #SBATCH block replaced by the directives above, and the settings after it
SCRIPT=$(awk -v d="$DIRECTIVES" -v s="$SETTINGS" '
  /^#SBATCH/ { if (!done) { print d; print s; done = 1 } next }
  { print }' "$TEMPLATE")

if [ "$DRY" = 1 ]; then
  printf '%s\n' "$SCRIPT"
  echo
  echo "# would run: sbatch <this script> $(printf '%q ' "$@")"
  exit 0
fi
command -v sbatch >/dev/null || { echo "submit.sh: sbatch not found (not on a SLURM login node?)" >&2; exit 3; }
mkdir -p "${JTOK_SBATCH_DIR:-runs/sbatch}"
FILE=$(mktemp "${JTOK_SBATCH_DIR:-runs/sbatch}/${NAME}-XXXXXX.sbatch")
printf '%s\n' "$SCRIPT" > "$FILE"
JOB=$(sbatch --parsable "$FILE" "$@")
echo "Submitted batch job $JOB (script $FILE; log $(echo "$OUTPUT" | sed "s/%x/$NAME/g; s/%j/${JOB%%;*}/g"))"
