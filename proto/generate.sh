#!/usr/bin/env bash
# Generates the Python message and gRPC stubs (with mypy stubs) for every proto
# under proto/ into clients/python/, the one place server and clients share.
# Usage: proto/generate.sh [OUT_DIR]   (default: clients/python)
# Also session_authority/v1/descriptors.binpb: the same protos as a descriptor set
# with their comments (--include_source_info; the *_pb2 modules carry none), which
# server reflection serves so that `grpcurl describe` shows them.
# Never edit the output by hand; `make check-generated` fails when it is stale.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/clients/python}
py=$(command -v "${PYTHON:-python}")
export PATH="$(dirname "$py"):$PATH"
cd "$root/proto"
mapfile -t protos < <(find . -name '*.proto' | sed 's|^\./||' | sort)
rm -f "$out"/session_authority/v1/*_pb2*.py "$out"/session_authority/v1/*_pb2*.pyi \
  "$out"/session_authority/v1/descriptors.binpb
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --mypy_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" \
  "${protos[@]}"
mkdir -p "$out/session_authority/v1"
"$py" -m grpc_tools.protoc -I . --include_source_info \
  --descriptor_set_out="$out/session_authority/v1/descriptors.binpb" "${protos[@]}"
