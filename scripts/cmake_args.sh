#!/usr/bin/env bash
# Prints the CMAKE_ARGS that llama-cpp-python (and the vendored llama-server) are built with.
#
# Why not -march=native: these machines advertise AMX, and ggml's AMX path dies with SIGILL on
# `tilezero` in worker threads (upstream llama.cpp bug). So we build with GGML_NATIVE=OFF and turn on
# exactly the ISA extensions this CPU reports, AMX always off.
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
args+=" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
has avx        && args+=" -DGGML_AVX=ON"
has avx2       && args+=" -DGGML_AVX2=ON"
has fma        && args+=" -DGGML_FMA=ON"
has f16c       && args+=" -DGGML_F16C=ON"
has bmi2       && args+=" -DGGML_BMI2=ON"
has avx_vnni   && args+=" -DGGML_AVX_VNNI=ON"
if has avx512f; then
  args+=" -DGGML_AVX512=ON"
  has avx512_vbmi && args+=" -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
fi
echo "$args"
