#!/usr/bin/env bash
# Set up a Prefect server for hcsseg; safe to re-run (after changing deployments/prefect.yaml too):
# the two work pools, the `gpu` global concurrency limit, and the deployments.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api bash infra/bootstrap.sh
#
# Environment:
#   HCSSEG_POOL_TYPE     type of pools created here: process (default), docker or kubernetes.
#                        Existing pools are left as they are (the Helm workers create theirs
#                        with the base job templates in infra/helm/).
#   HCSSEG_GPU_SLOTS     size of the `gpu` concurrency limit: GPU jobs at once (default 1)
#   HCSSEG_DEPLOYMENTS   space-separated deployment names to deploy (default: all)
#   HCSSEG_WATCH_FOLDER  folder for watch-plates/folder-cron (default: $PWD/data/incoming)
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v prefect >/dev/null; then
  PREFECT=prefect
elif [ -x .venv/bin/prefect ]; then
  PREFECT=.venv/bin/prefect
else
  echo "bootstrap: prefect not found (activate the environment hcsseg is installed in)" >&2
  exit 1
fi
: "${PREFECT_API_URL:?set PREFECT_API_URL to the server, e.g. http://127.0.0.1:4200/api}"
POOL_TYPE=${HCSSEG_POOL_TYPE:-process}
GPU_SLOTS=${HCSSEG_GPU_SLOTS:-1}
export HCSSEG_WATCH_FOLDER=${HCSSEG_WATCH_FOLDER:-$PWD/data/incoming}

for pool in hcsseg-cpu hcsseg-gpu; do
  if "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool: exists, left as it is"
  else
    "$PREFECT" work-pool create "$pool" --type "$POOL_TYPE" >/dev/null
    echo "work pool $pool: created ($POOL_TYPE)"
  fi
done

if "$PREFECT" gcl inspect gpu >/dev/null 2>&1; then
  "$PREFECT" gcl update gpu --limit "$GPU_SLOTS" >/dev/null
  echo "concurrency limit gpu: set to $GPU_SLOTS"
else
  "$PREFECT" gcl create gpu --limit "$GPU_SLOTS" >/dev/null
  echo "concurrency limit gpu: created with $GPU_SLOTS slot(s)"
fi

args=(--all)
if [ -n "${HCSSEG_DEPLOYMENTS:-}" ]; then
  args=()
  for name in $HCSSEG_DEPLOYMENTS; do args+=(--name "$name"); done
fi
"$PREFECT" --no-prompt deploy --prefect-file deployments/prefect.yaml "${args[@]}" >/dev/null
"$PREFECT" deployment ls
