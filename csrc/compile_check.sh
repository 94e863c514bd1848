#!/usr/bin/env bash
# CI compile check for csrc/ (compile only, nothing runs):
#   cfg_sample.cu          nvcc -c for sm_80 and sm_90 (plain CUDA C++, the kernel and its launcher);
#   cfg_sample_binding.cpp host-compiler syntax check against the venv's torch headers, as the torch
#                          extension loader would compile it on a GPU machine;
#   *_cpu.cpp              the CPU kernels, compiled as kernels/native.py builds them (they also run in the tests).
# The CUDA part is skipped with a message when nvcc is absent; exits non-zero on any compile error.
# Usage: bash csrc/compile_check.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${1:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for src in "$here"/*_cpu.cpp; do
  "${CXX:-g++}" -O3 -march=native -shared -fPIC -Wno-psabi -ffp-contract=off -Wall -Werror "$src" \
    -o "$out/$(basename "$src" .cpp).so"
  echo "compile_check: $(basename "$src") OK"
done

nvcc="$(command -v nvcc || true)"
if [[ -z "$nvcc" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then nvcc="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$nvcc" ]]; then
  echo "compile_check: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
# nvcc may be a wrapper script: ask it where its headers are (the INCLUDES line of a dry run).
read -r -a cuda_includes < <("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="\(.*\)".*/\1/p' | tr -d '"')

echo "compile_check: $("$nvcc" --version | tail -1)"
"$nvcc" -std=c++17 -O3 -c "$here/cfg_sample.cu" -o "$out/cfg_sample.o" \
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
  -Xcompiler -Wall -Werror=all-warnings
echo "compile_check: cfg_sample.cu OK (sm_80, sm_90)"

mapfile -t torch_includes < <("$python" -c 'from torch.utils.cpp_extension import include_paths
import sysconfig
print("\n".join(include_paths() + [sysconfig.get_paths()["include"]]))')
flags=()
for dir in "${torch_includes[@]}"; do flags+=("-I$dir"); done
"${CXX:-g++}" -std=c++20 -fsyntax-only "${flags[@]}" "${cuda_includes[@]}" -DTORCH_EXTENSION_NAME=gotr1_cfg_sample \
  "$here/cfg_sample_binding.cpp"
echo "compile_check: cfg_sample_binding.cpp OK"
