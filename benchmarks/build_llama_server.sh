#!/usr/bin/env bash
# Builds llama.cpp's own C++ `llama-server` from the llama.cpp that the pinned llama-cpp-python sdist
# vendors (vendor/llama.cpp), with the same ISA flags as our build and AMX off, so the benchmark compares
# engines, not compilers. Output: benchmarks/peers/llama-server. Takes ~5-8 minutes on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peers="$here/peers"
version=$(grep -o 'llama-cpp-python==[0-9.]*' "$root/Makefile" | head -1 | cut -d= -f3)
mkdir -p "$peers"
if [ ! -d "$peers/llama_cpp_python-$version" ]; then
  "$root/.venv/bin/pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$peers"
  tar -xzf "$peers/llama_cpp_python-$version.tar.gz" -C "$peers"
fi
src="$peers/llama_cpp_python-$version/vendor/llama.cpp"
# Our flags minus the ones that switch tools off, plus what llama-server needs; no web UI download.
flags=$("$root/scripts/cmake_args.sh" | sed 's/-DLLAMA_BUILD_EXAMPLES=OFF//')
cmake -S "$src" -B "$peers/build" -DCMAKE_BUILD_TYPE=Release $flags \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF > "$peers/cmake.log"
cmake --build "$peers/build" --target llama-server -j "$(nproc)" > "$peers/build.log"
cp "$peers/build/bin/llama-server" "$peers/llama-server"
echo "built $peers/llama-server"
