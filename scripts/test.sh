#!/usr/bin/env bash
# Set up, build, and run the whole test suite (CPU only; GPU tests skip where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
(cd build && ctest --output-on-failure -j "$(nproc)")
# CI (the CI variable set) also runs the tests under ASan + UBSan and every fuzz harness briefly
# (issue 21); locally: bash scripts/test_sanitized.sh, bash scripts/fuzz_smoke.sh.
if [ -n "${CI:-}" ]; then
  bash scripts/test_sanitized.sh
  bash scripts/fuzz_smoke.sh 30
fi
