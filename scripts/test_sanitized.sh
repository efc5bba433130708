#!/usr/bin/env bash
# The CPU unit tests under AddressSanitizer + UndefinedBehaviorSanitizer (CMake NEEDLE_SANITIZE:
# g++, every target instrumented, any report fatal), in build-asan/. CI runs it after the plain
# tests (scripts/test.sh); about 15 minutes on 2 cores from a cold build.
set -euo pipefail
cd "$(dirname "$0")/.."
B=build-asan
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
if [ ! -f "$B/CMakeCache.txt" ]; then
  cmake -S . -B "$B" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DNEEDLE_SANITIZE=ON >&2
fi
cmake --build "$B" -j "$(nproc)" >&2
# The tokenizer files of the exactness tests, when the plain build fetched them.
[ -d build/tokenizers ] && [ ! -d "$B/tokenizers" ] && cp -r build/tokenizers "$B/tokenizers"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp"
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
cd "$B"
ctest --output-on-failure -j "$(nproc)" --timeout 900
