#!/usr/bin/env bash
# Regenerate the Python modules of the API (messages, stubs, type stubs) from the .proto files.
#   bash scripts/gen_proto.sh [OUT_DIR]   (default: beside the .proto files, where they are committed)
# Needs grpcio-tools (the dev and test extras). tests/proto/test_proto_generated.py checks that the
# committed modules match what this script produces.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-proto}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    proto/loraplex/v1/loraplex.proto
