#!/usr/bin/env bash
# A CUDA toolkit without a GPU, from NVIDIA's PyPI wheels (nvcc, crt, nvvm, runtime headers,
# cccl), to prove that the `cuda` feature compiles. Idempotent: a complete cached copy is reused.
#
#   CUDA_HOME=$(scripts/cuda-toolkit.sh)
#
# Prints CUDA_HOME as the last line of stdout; everything else goes to stderr.
# Cache: $TESSERA_CACHE (default ~/.cache/tessera)/cuda-13.4.
set -euo pipefail

CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
DIR="$CACHE/cuda-13.4"
HOME_DIR="$DIR/nvidia/cu13"
WHEELS=(nvidia-cuda-nvcc==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-nvvm==13.4.92
        nvidia-cuda-runtime==13.4.92 nvidia-cuda-cccl==13.2.86)

if [ -x "$HOME_DIR/bin/nvcc" ] && [ -f "$DIR/.complete" ]; then
  echo "$HOME_DIR"
  exit 0
fi
echo "cuda-toolkit: downloading ${WHEELS[*]} from PyPI into $DIR" >&2
rm -rf "$DIR.part"
mkdir -p "$DIR.part/wheels"
python3 -m pip download --quiet --no-deps -d "$DIR.part/wheels" "${WHEELS[@]}" >&2
python3 -m pip install --quiet --no-deps --target "$DIR.part" "$DIR.part"/wheels/*.whl >&2
rm -rf "$DIR.part/wheels"
[ -x "$DIR.part/nvidia/cu13/bin/nvcc" ] || { echo "cuda-toolkit: no nvcc in the wheels" >&2; exit 1; }
rm -rf "$DIR"
mv "$DIR.part" "$DIR"
touch "$DIR/.complete"
echo "$HOME_DIR"
