#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` for the live engine checks (make test-engines), from the
# llama.cpp source vendored in the llama-cpp-python sdist the engines venv pins, so both servers
# run one llama.cpp. Outside the repository, once: about 20 min on 2 cores; later calls return at
# once. CPU only, no curl/OpenSSL (loopback checks); statically linked into one binary.
#
#   scripts/build_llama_server.sh [OUT_DIR]     (default ~/.cache/ipa_fast/llama-server)
#
# Prints the binary's path on success.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
OUT="${1:-$HOME/.cache/ipa_fast/llama-server}"
BIN="$OUT/bin/llama-server"
PY="${PYTHON:-python3}"

if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null || { echo "build_llama_server: cmake not found (apt-get install cmake)" >&2; exit 1; }
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

SRC="$OUT/src"
mkdir -p "$SRC"
SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
fi
TREE="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$TREE/tools/server/CMakeLists.txt" ] || tar xzf "$SDIST" -C "$SRC"

cmake -S "$TREE" -B "$OUT/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON >"$OUT/cmake.log" 2>&1 \
  || { echo "build_llama_server: cmake configure failed, see $OUT/cmake.log" >&2; exit 1; }
cmake --build "$OUT/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >"$OUT/build.log" 2>&1 \
  || { echo "build_llama_server: build failed, see $OUT/build.log" >&2; exit 1; }
mkdir -p "$OUT/bin"
cp "$OUT/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
