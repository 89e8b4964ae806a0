#!/usr/bin/env bash
# Build the llama.cpp peers of the CPU serving benchmarks (docs/cpu-serving.md) from the llama.cpp
# vendored in the PyPI sdist of llama-cpp-python (the registries are all this workplace reaches):
# llama-server, and llama-cpp-python itself (the sdist's Python package over the same llama.cpp
# built as shared libraries, in a virtual environment of its own). The instruction set is the
# host's, named explicitly (GGML_NATIVE=OFF): AVX-512 with VNNI and BF16 where the CPU has them,
# else AVX2 with FMA and F16C (AVX-VNNI where present); never AMX (llama.cpp's AMX kernel crashed
# on our VMs). Never part of CI: about 14 minutes on 2 cores.
#
#   tools/build_llama_server.sh [BUILD_DIR]      (default build/llama.cpp)
#     -> BUILD_DIR/bin/llama-server
#     -> BUILD_DIR/venv/bin/python with `import llama_cpp` (LLAMA_CPP_LIB_PATH=BUILD_DIR/lib)
set -euo pipefail
VERSION=0.3.36
BUILD_DIR=${1:-build/llama.cpp}
SRC_DIR=$BUILD_DIR/src
has() { grep -qw "$1" /proc/cpuinfo; }
on_off() { if has "$1"; then echo ON; else echo OFF; fi; }
if has avx512f; then
    ISA_FLAGS=(-DGGML_AVX512=ON -DGGML_AVX512_VNNI="$(on_off avx512_vnni)"
        -DGGML_AVX512_BF16="$(on_off avx512_bf16)")
else
    ISA_FLAGS=(-DGGML_AVX512=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
        -DGGML_AVX_VNNI="$(on_off avx_vnni)")
fi
CMAKE_FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF
    "${ISA_FLAGS[@]}" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
echo "llama.cpp instruction set: ${ISA_FLAGS[*]}" >&2
mkdir -p "$BUILD_DIR"
if [ ! -d "$SRC_DIR" ]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$BUILD_DIR/sdist"
    mkdir -p "$SRC_DIR"
    tar -xzf "$BUILD_DIR"/sdist/llama_cpp_python-$VERSION.tar.gz -C "$SRC_DIR" --strip-components=1
fi
if [ ! -x "$BUILD_DIR/bin/llama-server" ]; then
    cmake -S "$SRC_DIR/vendor/llama.cpp" -B "$BUILD_DIR/cmake" "${CMAKE_FLAGS[@]}" \
        -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
    cmake --build "$BUILD_DIR/cmake" --target llama-server -j "$(nproc)"
    mkdir -p "$BUILD_DIR/bin"
    cp "$BUILD_DIR/cmake/bin/llama-server" "$BUILD_DIR/bin/"
fi
if [ ! -x "$BUILD_DIR/venv/bin/python" ]; then
    cmake -S "$SRC_DIR/vendor/llama.cpp" -B "$BUILD_DIR/cmake-shared" "${CMAKE_FLAGS[@]}" \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DBUILD_SHARED_LIBS=ON
    cmake --build "$BUILD_DIR/cmake-shared" --target llama -j "$(nproc)"
    mkdir -p "$BUILD_DIR/lib"
    cp -P "$BUILD_DIR"/cmake-shared/bin/lib*.so* "$BUILD_DIR/lib/"
    python3 -m venv "$BUILD_DIR/venv"
    # llama-cpp-python's own dependencies; its package is the sdist's source, not rebuilt.
    "$BUILD_DIR/venv/bin/pip" install --quiet numpy typing-extensions diskcache jinja2
    site=$("$BUILD_DIR/venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
    realpath "$SRC_DIR" > "$site/llama_cpp_python.pth"
fi
echo "$BUILD_DIR/bin/llama-server"
