#!/usr/bin/env bash
# make test: the whole suite in two pytest runs, make check's tests first (-m check: a broken tree stops in
# minutes), then the rest (-m "not check"): every test once. With PYTEST_ARGS (test ids, -k, -m ...) it is one
# run of what they select. JTOK_TIER_TIMES=<file>: each run's wall time is appended to it (.ci/run prints them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
phase() {   # phase NAME PYTEST-ARGS...
  local name=$1; shift
  local t0=$SECONDS
  local rc=0
  "$PY" -m pytest -p no:cacheprovider "$@" || rc=$?
  [ -z "${JTOK_TIER_TIMES:-}" ] || printf '    %-26s %5d s%s\n' "$name" $((SECONDS - t0)) \
    "$([ $rc = 0 ] || echo " (failed: exit $rc)")" >> "$JTOK_TIER_TIMES"
  return $rc
}
if [ "$#" -gt 0 ]; then
  phase "make test $*" "$@"
else
  phase "-m check (make check's)" -m check
  phase "-m 'not check'" -m "not check"
fi
