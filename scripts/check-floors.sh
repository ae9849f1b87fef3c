#!/usr/bin/env bash
# Check that pyproject.toml's lower bounds are real: install the oldest releases it admits (uv's lowest-direct
# resolution: every direct dependency at the lowest version consistent with the others, on Linux x86_64 with
# PyPI's torch) into a fresh .venv-floors/ (or $LORAPLEX_VENV), import them, then run the default suite on them
# (arguments go to pytest), and tests/kernels once more with the newest NumPy (the oldest Triton's interpreter
# with it). Prints one verdict line: "floors: ..." and exits non-zero when a floor is not real.
# On a CPU host the floor torch is PyPI's CUDA build (several GB), as no CPU build of it is on PyPI.
set -uo pipefail
cd "$(dirname "$0")/.."

venv="${LORAPLEX_VENV:-.venv-floors}"
python="${PYTHON:-python3}"
log="${LORAPLEX_FLOORS_LOG:-$venv.log}"
UV=$(bash scripts/uv.sh) || exit 1
verdict() { echo "floors: $*"; }

floors=$("$UV" pip compile pyproject.toml --extra test --resolution lowest-direct --python-version 3.11 \
         --python-platform x86_64-manylinux_2_28 --no-header --no-annotate --quiet 2>&1) || {
    echo "$floors" >&2; verdict "pyproject.toml's lower bounds cannot be installed together (uv's reason above)"; exit 1; }
# each lower bound must itself be the oldest release that installs with the rest, not a number below it
{ read -r summary; read -r unreal; } < <(echo "$floors" | "$python" scripts/floors.py)
if [ "$unreal" != "-" ]; then
    verdict "lower bounds below the oldest release that installs with the rest: $unreal"; exit 1
fi

rm -rf "$venv"
"$python" -m venv "$venv"
if ! { echo "$floors" | "$UV" pip install --quiet --python "$venv/bin/python" -r - \
       && "$UV" pip install --quiet --python "$venv/bin/python" --no-deps -e . ; } > "$log" 2>&1; then
    cat "$log" >&2; verdict "the oldest admitted releases do not install: $summary"; exit 1
fi
if ! "$venv/bin/python" -c "import torch, transformers, transformers.activations, peft, bitsandbytes, triton, \
accelerate, grpc, google.protobuf, fastapi, numpy, loraplex.server.cli, loraplex.kernels, loraplex.clients" \
        >> "$log" 2>&1; then
    tail -20 "$log" >&2; verdict "the oldest admitted releases do not import: $summary"; exit 1
fi
# the suite, its tests imported as scripts/test.sh imports them
if ! result=$(bash scripts/run-suite.sh "$venv" "$log.pytest" "$@"); then
    verdict "FAILED on the oldest admitted releases ($result; log: $log.pytest): $summary"
    exit 1
fi
# the oldest Triton interprets the kernels (the CPU tests' path) with the newest NumPy too
if ! { "$UV" pip install --quiet --python "$venv/bin/python" --upgrade numpy > "$log.numpy" 2>&1 \
       && bash scripts/run-suite.sh "$venv" "$log.numpy" -q tests/kernels > /dev/null; }; then
    verdict "FAILED: tests/kernels with the newest NumPy on the oldest Triton (log: $log.numpy): $summary"
    exit 1
fi
numpy=$("$venv/bin/python" -c "import numpy; print(numpy.__version__)")
verdict "the oldest admitted releases install, import and pass the suite ($result; tests/kernels with numpy $numpy" \
        "too): $summary"
