#!/usr/bin/env bash
# A Python 3.12 venv holding what the GPU machine's image holds and nothing else (benchmarks/gpu/image.txt: torch,
# which on 3.12 is the package index's CUDA build and runs on CPU, with its Triton; numpy, transformers, tokenizers,
# safetensors, pyarrow, pytest). No megatron-core, Hydra or OmegaConf: tests/e2e/test_gpu_check.py runs check.sh in
# it, which installs the prepared wheels into a temporary target as on the GPU machine, so a wheel that
# prepare.sh misses fails there. Kept in the user's cache keyed by image.txt (JTOK_GPU_IMAGE_VENV overrides the
# place); never changed after it is built; prints its path last.
set -euo pipefail
cd "$(dirname "$0")"
KEY=$(grep -v '^#' image.txt | sha256sum | cut -c1-12)
VENV=${JTOK_GPU_IMAGE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/jtok-train/venv-py312-gpu-image-$KEY}
source ../../scripts/find_python312.sh
if [ ! -f "$VENV/.jtok-image-ok" ]; then
  PY=$(find_python312) || { echo "image_venv: no Python 3.12 found (set PYTHON312=/path/to/python3.12)" >&2; exit 1; }
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --only-binary=:all: -r image.txt
  "$VENV/bin/python" -c 'import torch, triton, numpy, transformers, tokenizers, safetensors, pyarrow, pytest'
  touch "$VENV/.jtok-image-ok"
fi
echo "$VENV"
