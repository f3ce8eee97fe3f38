#!/usr/bin/env bash
# The CPU demo, end to end on a fresh machine:
#   1. .venv with jtok-train and the CPU build of torch (scripts/setup.sh)
#   2. the demo corpus: the Python 3.11 documentation sources (Debian package python3.11-doc)
#   3. byte-level BPE tokenizer (4,096 ids) + Megatron indexed dataset in data/demo
#   4. tiny MoE + JTok-M trained by 2 ranks under torchrun on gloo; validation loss; checkpoint
# Extra arguments are Hydra overrides, e.g. `bash launch/demo.sh jtok=none train.run_dir=runs/demo_base`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

# the demo corpus and its dataset in data/demo (the recipe: data/build_demo.sh)
bash data/build_demo.sh

NPROC=${NPROC:-2}
# launch/torchrun.sh composes the config once (run_dir/config.yaml), then starts the ranks from it
exec bash launch/torchrun.sh --nproc-per-node "$NPROC" ${MASTER_PORT:+--master-port "$MASTER_PORT"} \
  model=tiny jtok=jtokm train=demo data=demo "$@"
