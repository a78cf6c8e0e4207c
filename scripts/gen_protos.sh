#!/usr/bin/env bash
# Generates the Python code (messages, gRPC stubs, typed .pyi stubs) for every proto
# under protos/ into src/llmesh/pb/ (git-ignored, never edited by hand). A wheel build
# runs the same generator (scripts/protogen.py) from setup.py into its build folder.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
exec "$py" "$root/scripts/protogen.py" "$root/src"
