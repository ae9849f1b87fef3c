#!/usr/bin/env bash
# Install (idempotent) and run the default test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv="${LORAPLEX_VENV:-.venv}"
# the pytest command, not `python -m pytest`: that would put the checkout root on sys.path
exec "$venv/bin/pytest" "$@"
