#!/usr/bin/env bash
# Make a Python venv holding the official `openai` client (PyPI, pinned below) for the
# OpenAI-compatibility acceptance script tests/python/openai_client.py. Idempotent: a venv
# that already has the pinned version is reused without touching the network.
#
#   PY=$(scripts/openai-venv.sh)
#   "$PY" tests/python/openai_client.py http://127.0.0.1:8000/v1 smollm2
#
# Prints the venv's python as the last line of stdout; everything else goes to stderr.
# Cache: $TESSERA_CACHE (default ~/.cache/tessera); the venv is $TESSERA_CACHE/venv-openai.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENAI_VERSION=2.54.0
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
VENV="$CACHE/venv-openai"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "openai-venv: $*" >&2; }

installed_version() {
  "$PY" -c 'import importlib.metadata as m; print(m.version("openai"))' 2>/dev/null || true
}

if [ -x "$PY" ] && [ "$(installed_version)" = "$OPENAI_VERSION" ]; then
  echo "$PY"
  exit 0
fi

command -v python3 >/dev/null || { log "python3 (3.8 or newer, with the venv module) is required"; exit 1; }
mkdir -p "$CACHE"
# A venv whose interpreter is gone (python upgraded or removed) cannot be repaired in place.
if [ -d "$VENV" ] && ! "$PY" -c 'import sys' >/dev/null 2>&1; then
  log "removing the broken venv $VENV"
  rm -rf "$VENV"
fi
if [ ! -x "$PY" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV" >&2
fi
log "installing openai==$OPENAI_VERSION from PyPI"
"$PY" -m pip install --quiet "openai==$OPENAI_VERSION" >&2
got=$(installed_version)
[ "$got" = "$OPENAI_VERSION" ] || { log "expected openai $OPENAI_VERSION in $VENV, found '${got:-none}'"; exit 1; }
echo "$PY"
