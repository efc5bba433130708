#!/usr/bin/env bash
# The main job: set up, build, and run greedy generation on a bundled test model.
# (Until the bundled needle-tiny model and the evaluation harness exist, the main job is
# `needle generate` on one of the transformers fixture models, which are random tiny models.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
./build/needle info -m tests/fixtures/models/qwen3_qknorm_gqa4_bf16
./build/needle generate -m tests/fixtures/models/qwen3_qknorm_gqa4_bf16 --prompt-ids 1,17,42,99,3 -n 16
