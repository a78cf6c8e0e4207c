#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the end-to-end suite, which starts the
# real mesh (tritonserver, Redis, services) once per session on free loopback ports.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
