#!/usr/bin/env bash
# The lock this host installs, and the versions it pins (scripts/install.sh, check-latest.sh, update-lock.sh):
#   bash scripts/lock.sh             requirements/lock-cuda.txt where nvidia-smi lists a GPU, else lock-cpu.txt
#   bash scripts/lock.sh pin NAME [FILE]   the version FILE (default: lock-cuda.txt) pins NAME to, or nothing
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = pin ]; then
    { sed -n "s/^$2==\([^ ;]*\).*/\1/p" "${3:-requirements/lock-cuda.txt}" 2>/dev/null || true; } | head -1
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo requirements/lock-cuda.txt
else
    echo requirements/lock-cpu.txt
fi
