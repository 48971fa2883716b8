#!/usr/bin/env bash
# Install the test dependencies and run the test suite (this is the README's test command).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
EXTRAS="openvino,test" VENV="$venv" bash "$here/scripts/setup_env.sh" || exit 1
cd "$here"
"$venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): treated as a failure, the suite must not be empty" >&2
  exit 1
fi
exit "$status"
