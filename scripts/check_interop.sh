#!/usr/bin/env bash
# Check that other tools open hcsseg's outputs: tests/test_interop.py (ngio, polars, the
# validators, napari's reader from .venv) plus iohub, which cannot live in .venv: iohub 0.3
# needs Python >= 3.12 and iohub 0.2 needs zarr 2. Each gets a venv of its own under
# $HCSSEG_INTEROP_VENVS (default ~/.cache/hcsseg-interop); the test runs their interpreters
# on plates written by .venv's hcsseg. Idempotent; needs the .venv of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${HCSSEG_INTEROP_VENVS:-$HOME/.cache/hcsseg-interop}
mkdir -p "$ROOT"

# the first interpreter that runs, among the names given and pyenv's installed versions
find_python() {
  local version=$1 candidate
  for candidate in "python$version" "$(pyenv root 2>/dev/null)"/versions/"$version".*/bin/python; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$version'.split('.')))" \
      >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# venv_with NAME PYTHON REQUIREMENT: a venv holding REQUIREMENT; prints its interpreter
venv_with() {
  local venv="$ROOT/$1"
  [ -x "$venv/bin/python" ] || "$2" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q "$3" >&2
  echo "$venv/bin/python"
}

pythons=()
if py=$(find_python 3.12); then
  pythons+=("$(venv_with iohub-0.3 "$py" "iohub>=0.3")")        # NGFF 0.4 and 0.5
else
  echo "no Python 3.12 found: skipping iohub 0.3 (NGFF 0.5 reader)" >&2
fi
if py=$(find_python 3.11); then
  pythons+=("$(venv_with iohub-0.2 "$py" "iohub>=0.2,<0.3")")   # NGFF 0.4 only (zarr 2)
fi

HCSSEG_IOHUB_PYTHON=$(IFS=:; echo "${pythons[*]}") \
  PREFECT_HOME=$(mktemp -d) .venv/bin/python -m pytest tests/test_interop.py -v "$@"
