# Sourced by scripts/setup312.sh and benchmarks/gpu/image_venv.sh: find_python312 prints a Python 3.12
# interpreter (PYTHON312, python3.12 on PATH, or pyenv's) or returns 1.
find_python312() {
  local c
  for c in "${PYTHON312:-}" python3.12 $(ls -d "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 2>/dev/null); do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  return 1
}
