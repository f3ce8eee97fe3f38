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

DOCS=/usr/share/doc/python3.11/html/_sources
if [ ! -d "$DOCS" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing the demo corpus (Debian package python3.11-doc) ..."
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null
  else
    echo "The demo corpus is missing: run 'sudo apt-get install python3.11-doc', or build your own with" >&2
    echo "  .venv/bin/jtok-data build --source DIR_OF_TEXT --out data/demo --vocab-size 4096" >&2
    exit 1
  fi
fi

.venv/bin/jtok-data build --source python-docs --out data/demo --vocab-size 4096

NPROC=${NPROC:-2}
# launch/torchrun.sh composes the config once (run_dir/config.yaml), then starts the ranks from it
exec bash launch/torchrun.sh --nproc-per-node "$NPROC" ${MASTER_PORT:+--master-port "$MASTER_PORT"} \
  model=tiny jtok=jtokm train=demo data=demo "$@"
