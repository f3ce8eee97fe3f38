#!/usr/bin/env bash
# The demo corpus recipe: the Python 3.11 documentation sources (the .rst.txt files of the Debian package
# python3.11-doc), a byte-level BPE tokenizer of 4,096 ids trained on them, and the Megatron indexed dataset in
# data/demo (`jtok-data stats data/demo` prints its size). Idempotent: an up-to-date build is skipped.
# Needs the project's venv (scripts/setup.sh); launch/demo.sh runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
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
exec "${JTOK_PYTHON:-.venv/bin/python}" -m jtok_train.cli.data build --source python-docs --out data/demo --vocab-size 4096 "$@"
