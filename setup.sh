#!/usr/bin/env bash
# Set up a virtual environment in .venv with the project installed (editable).
#   ./setup.sh          runtime dependencies (app, CLIs, training)
#   ./setup.sh --dev    + test/lint/type-check tools, the PostgreSQL driver, and (as root, via apt)
#                       Debian chromium for the browser test, postgresql for the database tests
#                       and nginx for the reverse-proxy test
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extra=""
if [[ "${1:-}" == "--dev" ]]; then extra="[dev,postgres]"; fi
if [[ ! -x .venv/bin/python ]]; then
  echo "creating .venv with $("$PY" --version 2>&1)..."
  "$PY" -m venv .venv
fi
echo "upgrading pip in .venv..."
.venv/bin/python -m pip install -q --upgrade pip
echo "installing dermfusion${extra} in editable mode (torch and friends: this can take minutes)..."
.venv/bin/python -m pip install -q -e ".${extra}"
if [[ -n "$extra" ]]; then
  # Debian packages the tests need: chromium (browser test), postgresql (initdb / pg_ctl for the
  # throw-away server of the PostgreSQL tests; no cluster is started by the tests' own means),
  # nginx (tests/test_proxy.py starts its own on a free port with a temporary config).
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
    || missing+=(postgresql)
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
  if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
      echo "installing Debian ${missing[*]} for the tests..."
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "warning: ${missing[*]} could not be installed; their tests will be skipped"
    else
      echo "note: ${missing[*]} not found; their tests will be skipped (apt-get install ${missing[*]})"
    fi
  fi
fi
echo "environment ready: .venv"
