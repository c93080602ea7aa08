#!/usr/bin/env bash
# Set up, lint, then run the test suite (slow/GPU tests excluded; `-m slow` runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check hcsseg flows tests bench deployments
export PREFECT_HOME=$(mktemp -d)
.venv/bin/python -m pytest "$@"
