#!/usr/bin/env bash
# The project's test command (README, and .ci/run): formatting, lints, every test
# of the workspace on the real SmolLM2 weights, then the `cuda` feature compile check.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

command -v cargo >/dev/null || { echo "test: cargo is required (rustup.rs)" >&2; exit 1; }
scripts/fetch-models.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast 2>&1
# The CUDA build (candle's CUDA back-end and kernels, NCCL) must compile: nvcc from PyPI wheels.
scripts/cuda-check.sh
