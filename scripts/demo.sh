#!/usr/bin/env bash
# Install anomalib-kd and run the offline demo (generated data, small backbone, CPU).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
VENV="$venv" bash "$here/scripts/setup_env.sh"
cd "$here"
exec "$venv/bin/anomalib-kd-demo" "$@"
