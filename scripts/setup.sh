#!/usr/bin/env bash
# Set up athanor in ./.venv from this checkout. Idempotent: re-running only installs what changed.
#   bash scripts/setup.sh          athanor and what serving needs
#   bash scripts/setup.sh --test   the same plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "athanor needs Python 3.11 or newer (found: $("$python" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --editable ".${extras}"
echo "athanor installed: $(.venv/bin/athanor version)"
