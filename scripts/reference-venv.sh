#!/usr/bin/env bash
# A Python venv with numpy and Hugging Face's tokenizers (PyPI, pinned below) for the
# independent references the tests compute (tests/python/minilm_reference.py). Idempotent: a
# venv that already has the pinned versions is reused without touching the network.
#
#   PY=$(scripts/reference-venv.sh)
#
# Prints the venv's python as the last line of stdout; everything else goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(numpy==2.4.6 tokenizers==0.23.3)
CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
VENV="$CACHE/venv-reference"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -x "$PY" ] && [ -f "$VENV/.pins" ] && [ "$(cat "$VENV/.pins")" = "${PINS[*]}" ]; then
  echo "$PY"
  exit 0
fi
echo "reference-venv: installing ${PINS[*]} into $VENV" >&2
rm -rf "$VENV"
python3 -m venv "$VENV" >&2
"$PY" -m pip install --quiet "${PINS[@]}" >&2
echo "${PINS[*]}" > "$VENV/.pins"
echo "$PY"
