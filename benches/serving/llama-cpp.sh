#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` and `llama-perplexity` (the benchmark's anchor) from the
# llama.cpp copy vendored in the PyPI `llama-cpp-python` sdist, with cmake and ninja from PyPI.
# Cached: prints the folder holding the two binaries.
#
#   benches/serving/llama-cpp.sh        # ~8 min cold on 2 cores, instant when cached
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${TESSERA_BENCH_CACHE:-$HOME/.cache/tessera/bench}/llama.cpp-$VERSION"
if [ -x "$CACHE/bin/llama-server" ] && [ -x "$CACHE/bin/llama-perplexity" ]; then
  echo "$CACHE/bin"
  exit 0
fi
log() { echo "llama-cpp: $*" >&2; }
mkdir -p "$CACHE"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "downloading the llama-cpp-python $VERSION sdist from PyPI"
# Only this package from source (its build tools, needed to read its metadata, as wheels).
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$work" "llama-cpp-python==$VERSION"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)
if [ ! -x "$CACHE/venv/bin/cmake" ]; then
  log "installing cmake and ninja from PyPI into $CACHE/venv"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install --quiet cmake ninja
fi
export PATH="$CACHE/venv/bin:$PATH"
log "building llama-server and llama-perplexity (native CPU flags)"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >&2
cmake --build "$work/build" --target llama-server llama-perplexity >&2
mkdir -p "$CACHE/bin"
cp "$work"/build/bin/llama-server "$work"/build/bin/llama-perplexity "$CACHE/bin/"
# Shared libraries, if the build made any.
find "$work/build" -name '*.so*' -exec cp -P {} "$CACHE/bin/" \; 2>/dev/null || true
echo "$CACHE/bin"
