#!/usr/bin/env bash
# Print the path of the uv that scripts/update-lock.sh and check-floors.sh use: $UV if set, else uv $UV_VERSION,
# installed into .venv-uv/ from PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.10
if [ -n "${UV:-}" ]; then
    echo "$UV"
    exit 0
fi
if [ ! -x .venv-uv/bin/uv ] || [ "$(.venv-uv/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    "${PYTHON:-python3}" -m venv .venv-uv
    .venv-uv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
fi
echo "$PWD/.venv-uv/bin/uv"
