#!/usr/bin/env bash
# Every libFuzzer harness of fuzz/ for SECONDS (default 30) on its corpus (scripts/fuzz.sh); CI
# runs it after the tests. A finding (crash, sanitizer report, an exception other than
# needle::Error) fails the run; its input is in build-fuzz/findings/HARNESS.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-30}
need=()
for p in clang-14 libclang-rt-14-dev; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${need[@]}" >&2
  else
    echo "fuzz_smoke: missing Debian packages: ${need[*]} (apt-get install -y ${need[*]})" >&2
    exit 1
  fi
fi
mkdir -p build-fuzz/logs
for h in config generation_config safetensors tokenizer data predictions results chat openai; do
  echo "fuzz_smoke: $h for ${SECS} s" >&2
  bash scripts/fuzz.sh "$h" "$SECS" > "build-fuzz/logs/$h.log" 2>&1 || {
    tail -40 "build-fuzz/logs/$h.log" >&2
    echo "fuzz_smoke: $h found something (input in build-fuzz/findings/$h)" >&2
    exit 1
  }
  grep -E "^stat::number_of_executed_units|^Done" "build-fuzz/logs/$h.log" | tr '\n' ' ' >&2; echo >&2
done
