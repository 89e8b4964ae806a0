#!/usr/bin/env bash
# Build llama.cpp's llama-server, the peer of the CPU serving benchmarks (docs/cpu-serving.md),
# from the llama.cpp vendored in the PyPI sdist of llama-cpp-python (the registries are all this
# workplace reaches). AVX-512 build without AMX (llama.cpp's AMX kernel crashed on our VMs).
# Never part of CI: about 12 minutes on 2 cores.
#
#   tools/build_llama_server.sh [BUILD_DIR]      -> BUILD_DIR/bin/llama-server (default build/llama.cpp)
set -euo pipefail
VERSION=0.3.36
BUILD_DIR=${1:-build/llama.cpp}
SRC_DIR=$BUILD_DIR/src
mkdir -p "$BUILD_DIR"
if [ ! -x "$BUILD_DIR/bin/llama-server" ]; then
    if [ ! -d "$SRC_DIR" ]; then
        python3 -m pip download --quiet --no-deps --no-binary :all: \
            "llama-cpp-python==$VERSION" -d "$BUILD_DIR/sdist"
        mkdir -p "$SRC_DIR"
        tar -xzf "$BUILD_DIR"/sdist/llama_cpp_python-$VERSION.tar.gz -C "$SRC_DIR" --strip-components=1
    fi
    cmake -S "$SRC_DIR/vendor/llama.cpp" -B "$BUILD_DIR/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF \
        -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build "$BUILD_DIR/cmake" --target llama-server -j "$(nproc)"
    mkdir -p "$BUILD_DIR/bin"
    cp "$BUILD_DIR/cmake/bin/llama-server" "$BUILD_DIR/bin/"
fi
echo "$BUILD_DIR/bin/llama-server"
