#!/usr/bin/env bash
# Compiles every CUDA source under csrc/cuda with `nvcc -c` (no link) against torch's headers, and the
# bindings with the CUDA registrations enabled, so the CUDA code cannot rot on machines without a GPU.
#
#   scripts/check_cuda_sources.sh                 # default architecture sm_90 (Hopper)
#   SPARSE_SAM_CUDA_ARCHS="sm_80 sm_90" scripts/check_cuda_sources.sh
#
# Needs nvcc (CUDA 13 supports sm_75 and newer; sm_75 and sm_90 are checked to compile) and an
# importable torch. Exits non-zero if any file fails to compile; without nvcc it says SKIPPED and exits 0
# unless SPARSE_SAM_REQUIRE_NVCC=1.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
NVCC=${NVCC:-nvcc}
ARCHS=${SPARSE_SAM_CUDA_ARCHS:-sm_90}

if ! command -v "$NVCC" >/dev/null; then
  # CI sets SPARSE_SAM_REQUIRE_NVCC=1 so that a missing toolkit cannot pass as success there.
  if [ "${SPARSE_SAM_REQUIRE_NVCC:-0}" = "1" ]; then
    echo "check_cuda_sources: nvcc not found (set NVCC=...)" >&2
    exit 1
  fi
  echo "check_cuda_sources: SKIPPED, nvcc not found (set NVCC=..., or SPARSE_SAM_REQUIRE_NVCC=1 to fail)" >&2
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mapfile -t INCLUDES < <("$PYTHON" - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()["include"]]:
    print(p)
PY
)
ABI=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")

# CPU-only torch wheels ship the c10/cuda headers without the CMake-generated config header they
# include; provide it (it only marks c10_cuda as a shared library) when it is missing.
if ! ls "${INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h" >/dev/null 2>&1; then
  mkdir -p "$work/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/shim/c10/cuda/impl/cuda_cmake_macros.h"
  INCLUDES+=("$work/shim")
fi
IFLAGS=()
for p in "${INCLUDES[@]}"; do IFLAGS+=("-I$p"); done

COMMON=(-std=c++20 -O2 -DSPARSE_SAM_WITH_CUDA "-D_GLIBCXX_USE_CXX11_ABI=$ABI" "${IFLAGS[@]}")
status=0
shopt -s nullglob
sources=(csrc/cuda/*.cu)
[ ${#sources[@]} -gt 0 ] || { echo "check_cuda_sources: no .cu files under csrc/cuda" >&2; exit 1; }
# One nvcc per core: the files are independent, and on a 2-core CI machine this halves the wait.
JOBS=${SPARSE_SAM_NVCC_JOBS:-$(nproc 2>/dev/null || echo 1)}
compile() {  # compile ARCH SRC: a failure is reported by its exit status
  echo "nvcc -c $2 (-arch=$1)"
  if ! "$NVCC" -c "$2" -o "$work/$(basename "$2").$1.o" -arch="$1" "${COMMON[@]}" \
      -Xcompiler -fPIC --expt-relaxed-constexpr; then
    echo "check_cuda_sources: FAILED to compile $2 for $1" >&2
    return 1
  fi
}
pids=()
for arch in $ARCHS; do
  for src in "${sources[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
    compile "$arch" "$src" &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
echo "c++ -c csrc/bindings.cpp (-DSPARSE_SAM_WITH_CUDA)"
if ! "${CXX:-c++}" -c csrc/bindings.cpp -o "$work/bindings.o" -fPIC "${COMMON[@]}" -Wall -Wno-c++20-extensions; then
  echo "check_cuda_sources: FAILED to compile csrc/bindings.cpp with CUDA registrations" >&2
  status=1
fi
[ $status -eq 0 ] && echo "check_cuda_sources: all CUDA sources compile"
exit $status
