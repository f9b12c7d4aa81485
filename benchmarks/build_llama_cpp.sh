#!/usr/bin/env bash
# Build llama.cpp (the peer in benchmarks/scale.py and benchmarks/gguf_quality.py) outside the repository.
#
# Its source comes from the llama-cpp-python sdist on PyPI (vendor/llama.cpp), so only a package registry is
# needed. The build is CPU-only with explicit x86 features instead of -march=native, and AMX off: AMX tiles
# fault on virtual machines that report the flag without enabling it. Only the tools the benchmarks use are
# built. A second venv carries convert_hf_to_gguf.py's own dependencies (CPU torch, transformers,
# sentencepiece, gguf-py from the same source tree) so that they never touch the project's venv.
#
# Idempotent: each step is skipped when its output exists. Usage:
#   benchmarks/build_llama_cpp.sh [DIR]      (DIR defaults to /work/tools; the build lands in DIR/llama.cpp)
set -euo pipefail
DIR=${1:-/work/tools}
SRC=$DIR/src
LLAMA=$DIR/llama.cpp
ENV=$DIR/llamaenv
PIP=${PIP:-pip}
JOBS=${JOBS:-2}
mkdir -p "$SRC"

if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  apt-get update && apt-get install -y cmake ninja-build
fi
if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
  ls "$SRC"/llama_cpp_python-*.tar.gz >/dev/null 2>&1 ||
    "$PIP" download --no-deps --no-binary :all: llama-cpp-python -d "$SRC"
  sdist=$(ls "$SRC"/llama_cpp_python-*.tar.gz | sort -V | tail -1)
  tar -xzf "$sdist" -C "$SRC"
  rm -rf "$LLAMA"
  cp -r "$SRC/$(basename "$sdist" .tar.gz)/vendor/llama.cpp" "$LLAMA"
fi
if [ ! -f "$LLAMA/build/build.ninja" ]; then
  cmake -S "$LLAMA" -B "$LLAMA/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
fi
ninja -C "$LLAMA/build" -j"$JOBS" llama-quantize llama-bench llama-simple

if [ ! -x "$ENV/bin/python" ]; then
  python3 -m venv "$ENV"
  "$ENV/bin/pip" install torch==2.13.0
  "$ENV/bin/pip" install transformers sentencepiece numpy protobuf
  "$ENV/bin/pip" install "$LLAMA/gguf-py"
fi

echo "llama.cpp binaries: $LLAMA/build/bin (llama-quantize, llama-bench, llama-simple)"
echo "converter:          $ENV/bin/python $LLAMA/convert_hf_to_gguf.py"
echo "benchmarks take:    --llama-cpp $LLAMA"
