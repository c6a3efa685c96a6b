#!/usr/bin/env bash
# Install DermFusion for serving: what the Dockerfile runs, and what CI runs in a test
# (tests/test_hosting_install.py) since images cannot be built on the CI machines.
#
#   docker/install.sh [--src DIR] [--venv DIR] [--user NAME:UID] [--data DIR] [--no-deps]
#                     [--torch-index URL] [--dry-run]
#
# Steps:
#   1. a virtual environment in --venv (default /opt/dermfusion/venv; an existing one is reused)
#   2. the project from --src (default: this script's repository) installed into it, NOT
#      editable, with the postgres extra: the shipped model (model/shipped) and the app's
#      examples come inside the package. --torch-index installs PyTorch from that index first
#      (e.g. a CPU-only wheel index: a much smaller image); --no-deps installs the project alone
#      (the test: its dependencies come from elsewhere)
#   3. as root: the unprivileged user (default dermfusion:1000) and its writable data folder
#      (default /data: the SQLite history when no PostgreSQL is configured)
#   4. a check that the installed copy starts: `python -m app --version`, the shipped model and
#      its ONNX export found inside the installed package
# --dry-run prints the commands instead of running them.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
VENV=/opt/dermfusion/venv
USER_SPEC=dermfusion:1000
DATA=/data
PY=${PYTHON:-python3}
NO_DEPS=0
DRY=0
TORCH_INDEX=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --src) SRC=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --user) USER_SPEC=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --no-deps) NO_DEPS=1; shift ;;
    --torch-index) TORCH_INDEX=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "docker/install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

run() {
  if [[ $DRY -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

if [[ ! -f "$SRC/pyproject.toml" ]]; then
  echo "docker/install.sh: $SRC has no pyproject.toml (use --src)" >&2
  exit 2
fi

echo "step 1: virtual environment $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
  run "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -q)

echo "step 2: install $SRC (not editable)"
if [[ $NO_DEPS -eq 1 ]]; then
  # the build backend and dependencies come from the environment the caller prepared
  run "${PIP[@]}" --no-deps --no-build-isolation "$SRC"
else
  run "${PIP[@]}" --upgrade pip
  if [[ -n "$TORCH_INDEX" ]]; then
    run "${PIP[@]}" --index-url "$TORCH_INDEX" torch torchvision
  fi
  run "${PIP[@]}" "$SRC[postgres]"
fi

echo "step 3: user ${USER_SPEC} and data folder $DATA"
NAME=${USER_SPEC%%:*}
UID_=${USER_SPEC##*:}
if [[ $(id -u) -eq 0 ]]; then
  if ! getent passwd "$UID_" >/dev/null; then
    run useradd --uid "$UID_" --create-home --shell /usr/sbin/nologin "$NAME"
  fi
  run mkdir -p "$DATA"
  run chown "$UID_" "$DATA"
else
  echo "  (not root: no user created; $DATA must be writable by $(id -un))"
  run mkdir -p "$DATA"
fi

echo "step 4: check the installed copy"
# from / so that the source tree in the current directory cannot stand in for the installed one
run sh -c "cd / && '$VENV/bin/python' -m app --version && '$VENV/bin/python' -c \"
import app
from model.checkpoint import ONNX_FILE, SHIPPED_DIR
assert (SHIPPED_DIR / 'config.json').is_file(), 'shipped model missing from the package'
assert (SHIPPED_DIR / ONNX_FILE).is_file(), 'ONNX export missing from the package'
print('installed at', app.__file__.rsplit('/', 2)[0], '; shipped model', SHIPPED_DIR)
\""
if [[ $DRY -eq 1 ]]; then
  echo "dry run: nothing was installed (the steps above would install DermFusion in $VENV)"
else
  echo "DermFusion installed in $VENV"
fi
