#!/usr/bin/env bash
# Create .venv (or $LORAPLEX_VENV) and install loraplex into it, editable, with the test extra.
#
# torch is installed before the package so that the right build is chosen:
#   - a host with an NVIDIA GPU (nvidia-smi lists one) gets PyPI's default torch, a CUDA build;
#   - any other host gets torch==$LORAPLEX_CPU_TORCH (default 2.13.0); where pip is configured with a
#     local CPU wheel (as on our dev and CI machines) that is the CPU build, elsewhere set
#     PIP_INDEX_URL/PIP_EXTRA_INDEX_URL to a CPU wheel index to avoid the multi-GB CUDA download.
#   - LORAPLEX_TORCH="torch==X" overrides both.
# An existing torch in the venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LORAPLEX_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${LORAPLEX_TORCH:-}" ]; then
        spec="$LORAPLEX_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        spec="torch>=2.8"  # its CUDA wheel pins the Triton it was built with: >= 3.4 from 2.8 on
    else
        spec="torch==${LORAPLEX_CPU_TORCH:-2.13.0}"
    fi
    echo "install.sh: installing $spec" >&2
    "${pip[@]}" "$spec"
fi

# pip warns about unreadable entries of locally configured indexes; they are harmless.
"${pip[@]}" -e ".[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "install.sh: loraplex installed in $venv" >&2
