#!/usr/bin/env bash
# Install (idempotent) and run the default test suite. Extra arguments go to pytest.
# LORAPLEX_LATEST=1 installs the newest releases instead of the lock (with LORAPLEX_VENV=.venv-latest to keep
# .venv locked); scripts/check-latest.sh does that in a fresh venv and names what differs from the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv="${LORAPLEX_VENV:-.venv}"
# the pytest command, not `python -m pytest`: that would put the checkout root on sys.path
exec "$venv/bin/pytest" "$@"
