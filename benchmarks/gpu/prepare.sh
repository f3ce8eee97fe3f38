#!/usr/bin/env bash
# Prepare the GPU check on a CPU machine (with network), before a GPU machine is lent:
#   bash benchmarks/gpu/prepare.sh [--wheels-only | --verify]
# 1. downloads into benchmarks/gpu/wheels/ (ignored by git) the wheels of benchmarks/gpu/wheels.txt: what the
#    check imports that the GPU machine's image (benchmarks/gpu/image.txt: Python 3.12, torch, Triton, numpy,
#    transformers, tokenizers, safetensors, pyarrow, pytest) lacks; cp312 manylinux x86-64 or pure Python, no
#    dependencies resolved (never torch, Triton or nvidia-*); a package with no wheel is built into one here;
# 2. builds the demo data (data/demo, data/build_demo.sh) when it is missing;
# 3. prints the size that travels (tracked tree + wheels + data/demo) against the 64 MiB limit, and the `run`
#    tool's carry list and command.
# The wheels are kept in the user's cache too (jtok-train/gpu-wheels), so a fresh checkout takes them from there.
# --wheels-only: step 1 and the size, no data build (tests/e2e/test_gpu_check.py, which brings its own data).
# --verify: also runs the check's dry run in a Python 3.12 venv holding only what the image holds
# (benchmarks/gpu/image_venv.sh, ~5 GB, kept in the user's cache), as tests/e2e/test_gpu_check.py does.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=benchmarks/gpu/wheels
LIMIT=$((64 * 1024 * 1024))
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/jtok-train/gpu-wheels
MODE=${1:-}
case "$MODE" in ""|--wheels-only|--verify) ;; *) echo "usage: prepare.sh [--wheels-only | --verify]" >&2; exit 2;; esac
mkdir -p "$WHEELS" "$CACHE"
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
TAGS=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_28_x86_64 --platform any)

# the wheels: one download per requirement (exactly the list; stale files removed)
keep=()
while read -r req; do
  req=${req%%#*}; req=${req// /}
  [ -n "$req" ] || continue
  name=${req%%==*}; ver=${req#*==}
  stem=$(echo "$name" | tr 'A-Z-.' 'a-z__')
  have=$(ls "$WHEELS" 2>/dev/null | grep -i "^${stem}-${ver}-" | head -1 || true)
  if [ -z "$have" ]; then
    cached=$(ls "$CACHE" | grep -i "^${stem}-${ver}-" | head -1 || true)
    if [ -n "$cached" ]; then
      cp "$CACHE/$cached" "$WHEELS/"
    elif ! "${PIP[@]}" download -q "${TAGS[@]}" -d "$WHEELS" "$req" 2>/dev/null; then
      # no wheel for Python 3.12 on the index (antlr4-python3-runtime 4.9.3 is a source release): build one
      echo "prepare: $req has no wheel; building one from its source release"
      tmp=$(mktemp -d)
      "${PIP[@]}" wheel -q --no-deps --no-binary=:all: -w "$tmp" "$req"
      whl=$(ls "$tmp"/*.whl)
      case "$whl" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-*) ;;
        *) echo "prepare: $req built as $(basename "$whl"), not a wheel Python 3.12 can use" >&2; exit 1;; esac
      mv "$whl" "$WHEELS/"
      rm -rf "$tmp"
    fi
    have=$(ls "$WHEELS" | grep -i "^${stem}-${ver}-" | head -1 || true)
    [ -n "$have" ] || { echo "prepare: $req: no file $stem-$ver-*.whl after the download" >&2; exit 1; }
    [ -f "$CACHE/$have" ] || cp "$WHEELS/$have" "$CACHE/"
  fi
  keep+=("$have")
done < benchmarks/gpu/wheels.txt
for f in "$WHEELS"/*; do
  [ -e "$f" ] || continue
  printf '%s\n' "${keep[@]}" | grep -qxF "$(basename "$f")" || { echo "prepare: removing stale $(basename "$f")"; rm -rf "$f"; }
done

# the demo data
if [ "$MODE" != --wheels-only ] && { [ ! -f data/demo/text_document.idx ] || [ ! -f data/demo/tokenizer.json ]; }; then
  if [ -x .venv/bin/python ]; then
    bash data/build_demo.sh
  else
    echo "prepare: data/demo is missing and there is no .venv to build it: run 'make setup && bash data/build_demo.sh'" >&2
    exit 1
  fi
fi

# Megatron's dataset index cache (data/demo/cache) is rebuilt where it is missing: it does not travel
[ ! -d data/demo/cache ] || { rm -rf data/demo/cache; echo "prepare: removed data/demo/cache (Megatron rebuilds it)"; }

# what travels: the tree (tracked and untracked-but-not-ignored files) + the carried paths
tree=$(git ls-files -z --cached --others --exclude-standard | { xargs -0 stat -c %s 2>/dev/null || true; } |
       awk '{s+=$1} END {print s+0}')
wheels=$(find "$WHEELS" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
data=$(find data/demo -type f -printf '%s\n' 2>/dev/null | awk '{s+=$1} END {print s+0}')
total=$((tree + wheels + data))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels     $(mib "$wheels")  ($(ls "$WHEELS" | wc -l) files in $WHEELS)"
echo "data/demo  $(mib "$data")$([ "$data" -gt 0 ] || echo "  (not built here: about 6.2 MiB)")"
echo "tree       $(mib "$tree")  (tracked and untracked files git does not ignore)"
echo "total      $(mib "$total")  of the 64.0 MiB the GPU machine takes"
if [ "$total" -gt "$LIMIT" ]; then
  echo "prepare: over the limit by $(mib $((total - LIMIT)))" >&2
  exit 1
fi
if [ "$MODE" = --verify ]; then
  VENV=$(bash benchmarks/gpu/image_venv.sh | tail -1)
  PYTHON="$VENV/bin/python" bash benchmarks/gpu/check.sh --dry-run --out "$(mktemp -d)"
fi
echo
echo "run tool, carry: [\"$WHEELS\", \"data/demo\"]"
echo "run tool, command: bash benchmarks/gpu/check.sh --out \$OUT"
