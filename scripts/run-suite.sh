#!/usr/bin/env bash
# Run the suite in a virtual environment for scripts/check-latest.sh and check-floors.sh:
#   bash scripts/run-suite.sh VENV LOG [pytest arguments]
# pytest's output goes to LOG; prints pytest's summary ("N passed, ..." without the time), lists the FAILED and
# ERROR lines on stderr when it fails, and exits with pytest's status.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$1 log=$2
shift 2
"$venv/bin/pytest" "$@" > "$log" 2>&1
status=$?
grep -E "^(=+ )?[0-9]+ (passed|failed)" "$log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ in [0-9.]*s.*//'
[ "$status" -eq 0 ] || grep -E "^(FAILED|ERROR) " "$log" | head -20 >&2
exit "$status"
