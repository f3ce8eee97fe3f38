#!/usr/bin/env bash
# Create .venv (Python 3.11) and install jtok-train with the CPU build of torch. Idempotent.
#   bash scripts/setup.sh          # what `make demo` needs
#   bash scripts/setup.sh --test   # also what `make test` needs to run every test (nothing skipped):
#                                  #   DALI (its CPU operators run the DALI loader's test), the demo corpus
#                                  #   (python3.11-doc), and root + apt-get for the local SLURM cluster test
#   bash scripts/setup.sh --test-fast   # the same for `make test-fast` (no SLURM test: it is a slow one)
#   bash scripts/setup.sh --docs        # what `make docs` needs (--test and --test-fast install it too)
# Anything --test cannot provide stops the setup with a line saying what and how; JTOK_ALLOW_SKIPS=1 turns those
# into warnings (and lets the tests that need them skip, see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.jtok-installed   # holds the extras installed
extras=dev,triton,analysis
case "${1:-}" in --test|--test-fast|--docs) extras=dev,triton,analysis,docs ;; esac   # docs: make docs (a CI tier)
have=$(cat "$stamp" 2>/dev/null || true)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ requirements/cpu.txt -nt "$stamp" ] \
   || { [ "$have" != "$extras" ] && [ "$have" != dev,triton,analysis,docs ]; }; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -r requirements/cpu.txt
  .venv/bin/pip install -q -e ".[$extras]"
  echo "$extras" > "$stamp"
fi
case "${1:-}" in --test|--test-fast) ;; *) exit 0 ;; esac

missing=()
# DALI: an optional GPU extra; its CPU operators let tests/unit/test_dali.py compare its batches for real
if ! .venv/bin/python -c "import nvidia.dali" >/dev/null 2>&1; then
  echo "setup: installing nvidia-dali-cuda120 (the DALI loader's test runs on its CPU operators) ..." >&2
  .venv/bin/pip install -q nvidia-dali-cuda120 || true
  .venv/bin/python -c "import nvidia.dali" >/dev/null 2>&1 \
    || missing+=("nvidia-dali-cuda120 did not install into .venv (try: .venv/bin/pip install nvidia-dali-cuda120)")
fi
# the demo corpus: the README demo's test trains on it
DOCS=/usr/share/doc/python3.11/html/_sources
if [ ! -d "$DOCS" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing the demo corpus (Debian package python3.11-doc) ..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc) >/dev/null || true
  fi
  [ -d "$DOCS" ] || missing+=("the demo corpus $DOCS is missing (run: sudo apt-get install python3.11-doc)")
fi
# the local SLURM cluster (launch/slurm/local_cluster.sh installs slurm-wlm and munge itself, as root)
if [ "$1" = --test-fast ]; then
  :
elif [ "$(id -u)" != 0 ]; then
  missing+=("the SLURM test starts slurmctld/slurmd on this machine and needs root (run make test as root)")
elif ! { command -v slurmctld >/dev/null && command -v munged >/dev/null; } && ! command -v apt-get >/dev/null; then
  missing+=("slurm-wlm and munge are missing and there is no apt-get to install them")
fi
if [ ${#missing[@]} -gt 0 ]; then
  for m in "${missing[@]}"; do echo "setup: ERROR: $m" >&2; done
  if [ "${JTOK_ALLOW_SKIPS:-0}" = 1 ]; then
    echo "setup: JTOK_ALLOW_SKIPS=1: going on; the tests that need these will be skipped" >&2
  else
    echo "setup: make test runs every test and cannot here; fix the above, or set JTOK_ALLOW_SKIPS=1 to run the rest" >&2
    exit 1
  fi
fi
