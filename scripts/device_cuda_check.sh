#!/usr/bin/env bash
# One device-tool command for the CUDA backend: the GPU tests, then the benchmarks next to
# PyTorch. Build on the dev machine first, then carry .dev/gpu:
#   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build
#   bash scripts/pack_for_device.sh build
#   device run (carry .dev/gpu):  bash scripts/device_cuda_check.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=$PWD/.dev/gpu/lib:/usr/local/cuda/lib64
export NEEDLE_FIXTURES_DIR=$PWD/tests/fixtures/models
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ "$what" = tests ] || [ "$what" = all ]; then
  .dev/gpu/needle_tests --gtest_filter='*Cuda*' 2>&1 | grep -Ev '^\[ +(RUN|OK) ' | tail -60
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  bash bench/bench_cuda.sh .dev/gpu/bench_cuda
fi
