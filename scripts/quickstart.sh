#!/usr/bin/env bash
# Quick start: set up, then run the main job (mesh up + demo). The mesh stays up;
# stop it with `.venv/bin/llmesh down`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/llmesh demo "$@"
