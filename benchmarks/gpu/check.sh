#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu/check.py): `bash benchmarks/gpu/check.sh [--dry-run] [--out DIR]`.
# Uses the project's .venv when there is one, else the machine's python3 (a GPU machine's own environment).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu/check.py "$@"
