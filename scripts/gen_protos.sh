#!/usr/bin/env bash
# Generates the Python code (messages, gRPC stubs, typed .pyi stubs) for every
# proto under protos/ into src/. The output is never edited by hand and never
# committed: the set-up runs this, and CI proves a fresh clone generates it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
cd "$root"
wkt="$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
bin="$(dirname "$py")"
mapfile -t protos < <(find protos -name '*.proto' | sort)
# Clear stale output so a deleted proto does not leave modules behind.
for d in protos/llmesh/*/; do
  rm -rf "src/llmesh/$(basename "$d")/v1"
done
"$py" -m grpc_tools.protoc -I protos -I "$wkt" \
  --python_out=src --grpc_python_out=src \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" --mypy_out=src \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" --mypy_grpc_out=src \
  "${protos[@]}"
for d in protos/llmesh/*/; do
  svc="$(basename "$d")"
  touch "src/llmesh/$svc/__init__.py" "src/llmesh/$svc/v1/__init__.py"
done
echo "generated ${#protos[@]} protos into src/llmesh/*/v1"
