#!/usr/bin/env bash
# Set up a virtual environment in .venv with the project installed (editable).
#   ./setup.sh          runtime dependencies (app, CLIs, training)
#   ./setup.sh --dev    + test/lint/type-check tools and Debian chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extra=""
if [[ "${1:-}" == "--dev" ]]; then extra="[dev]"; fi
if [[ ! -x .venv/bin/python ]]; then
  echo "creating .venv with $("$PY" --version 2>&1)..."
  "$PY" -m venv .venv
fi
echo "upgrading pip in .venv..."
.venv/bin/python -m pip install -q --upgrade pip
echo "installing dermfusion${extra} in editable mode (torch and friends: this can take minutes)..."
.venv/bin/python -m pip install -q -e ".${extra}"
if [[ -n "$extra" ]] && ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian chromium for the browser test..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: chromium could not be installed; the browser test will be skipped"
  else
    echo "note: no chromium found; the browser test will be skipped (apt-get install chromium)"
  fi
fi
echo "environment ready: .venv"
