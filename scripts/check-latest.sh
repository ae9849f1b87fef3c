#!/usr/bin/env bash
# Run the default suite on the newest releases pyproject.toml allows, ignoring the lock: a fresh .venv-latest/
# (or $LORAPLEX_VENV) made by `scripts/install.sh --latest`; arguments go to pytest. Prints one verdict line,
# "newest releases: ...", with the packages whose versions differ from the lock, and exits non-zero when the
# suite fails there. When it fails and the lock passes, an upstream release broke loraplex: fix it (or bound the
# release out in pyproject.toml) before refreshing the lock with scripts/update-lock.sh.
set -uo pipefail
cd "$(dirname "$0")/.."

venv="${LORAPLEX_VENV:-.venv-latest}"
log="${LORAPLEX_LATEST_LOG:-$venv.log}"
verdict() { echo "newest releases: $*"; }

rm -rf "$venv"
if ! LORAPLEX_VENV="$venv" bash scripts/install.sh --latest > "$log" 2>&1; then
    tail -20 "$log" >&2; verdict "do not install (log: $log)"; exit 1
fi
lock=$(bash scripts/lock.sh)
# the installed distributions whose versions differ from the lock's pins (markers evaluated here)
differ=$("$venv/bin/python" - "$lock" <<'EOF'
import importlib.metadata, re, sys
from packaging.markers import Marker
from packaging.utils import canonicalize_name

locked = {}
for line in open(sys.argv[1]):
    match = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)\s*(?:;\s*(.+?))?\s*\\?$", line)
    if match and (match[3] is None or Marker(match[3]).evaluate()):
        locked[canonicalize_name(match[1])] = match[2]
installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
changes = [f"{name} {locked[name]} -> {installed.get(name, 'absent')}"
           for name in sorted(locked) if installed.get(name) != locked[name]]
changes += [f"{name} {installed[name]} (not in the lock)" for name in sorted(installed)
            if name not in locked and name not in {"loraplex", "torch", "pip", "setuptools", "wheel"}]
print(", ".join(changes) or "none")
EOF
)
if ! result=$(bash scripts/run-suite.sh "$venv" "$log.pytest" "$@"); then
    first=$(grep -m1 -E "^(FAILED|ERROR) " "$log.pytest" | cut -d' ' -f2)
    verdict "FAILED (${result:-no summary}; first: ${first:-see $log.pytest}); versions differing from $lock: $differ"
    exit 1
fi
verdict "${result} (versions differing from $lock: $differ)"
