#!/usr/bin/env bash
# Prove the `cuda` feature compiles (candle's CUDA back-end and kernels, the NCCL back-end)
# on a machine without a GPU: nvcc comes from NVIDIA's PyPI wheels (scripts/cuda-toolkit.sh).
# Checks only — linking a CUDA binary would need the driver libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

CUDA_HOME=$(scripts/cuda-toolkit.sh | tail -n 1)
export CUDA_HOME CUDA_PATH="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
echo "cuda-check: nvcc $(nvcc --version | tail -n 1), compute cap $CUDA_COMPUTE_CAP" >&2
cargo clippy --quiet -p tessera-kernels -p tessera-parallel -p tessera-models -p tessera --all-targets --features cuda -- -D warnings
echo "cuda-check: cargo clippy --features cuda succeeded (tessera-kernels, tessera-parallel, tessera-models, tessera)"
# Our CUDA kernels: nvcc built them for sm_80 and sm_90 in the build script above; these tests
# check the images and that every entry point the Rust side names is in the device code.
cargo test --quiet -p tessera-kernels --features cuda --lib cuda::
echo "cuda-check: the CUDA kernels compile for sm_80 and sm_90, and their entry points are all there"
