#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu/check.py): `bash benchmarks/gpu/check.sh [--dry-run] [--out DIR]`.
#
# On the GPU machine as it comes (Python 3.12 with torch, Triton, numpy, transformers, tokenizers, safetensors,
# pyarrow, pytest; no network), after benchmarks/gpu/prepare.sh ran on a CPU machine and the run tool carried
# ["benchmarks/gpu/wheels", "data/demo"]:  bash benchmarks/gpu/check.sh --out $OUT
# The interpreter: $PYTHON, else the project's .venv, else python3. Where it cannot import megatron.core, the
# carried wheels are installed into a temporary target (pip --no-index --no-deps; plain unzipping where the
# machine has no pip), and the target, the repository and kernels/ (jtok_kernels) go on PYTHONPATH: the
# repository is not installed. The JSON and every step's log land in --out.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=benchmarks/gpu/wheels
TARGET=
cleanup() { [ -z "$TARGET" ] || rm -rf "$TARGET"; }
trap cleanup EXIT
if ! "$PY" -c 'import megatron.core' >/dev/null 2>&1; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu check: megatron.core is not importable by $PY and $WHEELS holds no wheels:" >&2
    echo "  run 'bash benchmarks/gpu/prepare.sh' on a CPU machine and carry $WHEELS" >&2
    exit 2
  fi
  TARGET=$(mktemp -d "${TMPDIR:-/tmp}/jtok_gpu_wheels.XXXXXX")
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --no-warn-script-location \
      --target "$TARGET" "$WHEELS"/*.whl
  else   # a wheel is a zip: its files (and *.data/purelib|platlib) go to the target as they are
    "$PY" - "$TARGET" "$WHEELS"/*.whl <<'EOF'
import shutil, sys, zipfile
from pathlib import Path
target = Path(sys.argv[1])
for whl in sys.argv[2:]:
    zipfile.ZipFile(whl).extractall(target)
for data in target.glob("*.data"):
    for lib in ("purelib", "platlib"):
        if (data / lib).is_dir():
            shutil.copytree(data / lib, target, dirs_exist_ok=True)
    shutil.rmtree(data)
EOF
  fi
  echo "gpu check: installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $TARGET"
fi
export JTOK_GPU_CHECK_WHEELS=${TARGET:+$(cd "$WHEELS" && ls *.whl | paste -sd, -)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/kernels${TARGET:+:$TARGET}${PYTHONPATH:+:$PYTHONPATH}"
"$PY" benchmarks/gpu/check.py "$@"
