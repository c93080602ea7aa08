#!/usr/bin/env bash
# Set up, then import a demo plate and process it with Prefect's embedded server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
unset PREFECT_API_URL
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
.venv/bin/hcsseg demo demo --shared-data ../shared/data
.venv/bin/hcsseg info demo/demo.zarr
