#!/usr/bin/env bash
# Set up, build, and run the whole test suite (CPU only; GPU tests skip where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
cd build
ctest --output-on-failure -j "$(nproc)"
