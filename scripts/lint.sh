#!/usr/bin/env bash
# Lint, format and types (zero findings required; CI runs this before the tests):
# ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade), ruff format, mypy --strict.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python scripts/typecheck.py
