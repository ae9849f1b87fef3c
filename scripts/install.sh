#!/usr/bin/env bash
# Create .venv (or $LORAPLEX_VENV) and install loraplex into it, editable, with the test extra.
#
#   bash scripts/install.sh            the locked versions the suite passed with (default): every package at the
#                                      version and hash in requirements/lock-cpu.txt, or lock-cuda.txt on a host
#                                      where nvidia-smi lists a GPU
#   bash scripts/install.sh --latest   the newest releases pyproject.toml allows, ignoring the lock (also
#                                      LORAPLEX_LATEST=1): how upstream breakage is found before users find it
#
# torch comes first, its build chosen by the host: the CUDA lock holds PyPI's torch (a CUDA build); any other host
# gets torch==V from the machine's pip configuration, V being the lock's torch, which is the CPU build where pip
# finds one (a local wheel, as on our dev and CI machines, or PyTorch's CPU index in PIP_EXTRA_INDEX_URL; without
# either pip takes PyPI's multi-GB CUDA build). LORAPLEX_TORCH="torch==X" overrides that (an untested set).
# With --latest a GPU host takes the newest torch; a CPU host keeps the lock's CPU build.
# The lock is rewritten by scripts/update-lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

latest="${LORAPLEX_LATEST:-}"
for arg in "$@"; do
    case "$arg" in
        --latest) latest=1 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument '$arg' (usage: bash scripts/install.sh [--latest])" >&2; exit 2 ;;
    esac
done

venv="${LORAPLEX_VENV:-.venv}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: loraplex needs Python >= 3.11; $python is $("$python" -V 2>&1) (set PYTHON=python3.X)" >&2
    exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# pip warns about unreadable entries of locally configured indexes; they are harmless
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

lock=$(bash scripts/lock.sh)
gpu=$([ "$lock" = requirements/lock-cuda.txt ] && echo 1 || true)
torch_version=$(bash scripts/lock.sh pin torch)
installed_torch() { "$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true; }

if [ -n "${LORAPLEX_TORCH:-}" ]; then
    torch_spec="$LORAPLEX_TORCH"
elif [ -n "$gpu" ] && [ -n "$latest" ]; then
    torch_spec="torch"
elif [ -z "$gpu" ]; then
    torch_spec="torch==$torch_version"
else
    torch_spec=  # the CUDA lock installs torch itself
fi
if [ -n "$torch_spec" ] && { [ -n "${LORAPLEX_TORCH:-}" ] || [ -n "$latest" ] || [ "$(installed_torch)" != "$torch_version" ]; }; then
    echo "install.sh: installing $torch_spec" >&2
    pip install --quiet --upgrade "$torch_spec"
fi

if [ -n "$latest" ]; then
    # torch stays what was just chosen: an eager upgrade would otherwise replace a CPU build with PyPI's CUDA one
    constraint=$(mktemp)
    trap 'rm -f "$constraint"' EXIT
    echo "torch==$(installed_torch)" > "$constraint"
    pip install --quiet --upgrade --upgrade-strategy eager --constraint "$constraint" -e ".[test]"
    echo "install.sh: the newest releases pyproject.toml allows, not the lock, installed in $venv" >&2
else
    pip install --quiet --require-hashes --no-deps -r "$lock"
    pip install --quiet --no-deps -e .
    echo "install.sh: loraplex installed in $venv from $lock" >&2
fi
if ! pip check >/dev/null; then
    pip check >&2
    echo "install.sh: $venv does not meet the requirements above; if pyproject.toml changed, refresh the lock" \
         "(bash scripts/update-lock.sh)" >&2
    exit 1
fi
