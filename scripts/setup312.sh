#!/usr/bin/env bash
# A Python 3.12 venv with megatron-core 0.19.2 (0.17 and later need Python >= 3.12) and torch 2.13.0 (on 3.12 the
# package index's torch is the CUDA build, ~5 GB; it runs on CPU), with this checkout installed editable.
# Kept between runs in the user's cache (JTOK_VENV312 overrides the place); prints the venv's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE=${JTOK_MCORE_312:-0.19.2}
VENV=${JTOK_VENV312:-${XDG_CACHE_HOME:-$HOME/.cache}/jtok-train/venv-py312-mcore$MCORE}
source scripts/find_python312.sh   # (cwd: the repository root)
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python312) || { echo "setup312: no Python 3.12 found (set PYTHON312=/path/to/python3.12)" >&2; exit 1; }
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
want="torch==2.13.0 megatron-core==$MCORE"
stamp="$VENV/.jtok-deps"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q $want
  echo "$want" > "$stamp"
fi
"$VENV/bin/pip" install -q -e ".[dev,triton]" "megatron-core==$MCORE" >/dev/null
echo "$VENV"
