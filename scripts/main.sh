#!/usr/bin/env bash
# The main job: set up, build, and run two evaluations of the bundled model models/needle-tiny,
# each with dense and block-sparse attention side by side:
#  1. the classic needle-in-a-haystack (the San Francisco needle in the Jargon File, swept over 5
#     depths at 1K-8K tokens): runs/main/summary.md and runs/main/heatmap_{dense,sparse}.{png,svg}.
#     The sparse settings are scaled down to these short contexts so that sparse attention reads
#     a small part of the cache: 64 initial tokens, a 512-token local window and the top 8 blocks
#     of 64 tokens (at most ~1.1K of the 8K tokens of the longest prompt);
#  2. passkey at 32K tokens, twice the model's 16K training length, at 3 depths
#     (runs/main_32k/): dense attention fails there (positions it never saw); sparse attention
#     with a sparse prefill and block-wise position remapping (every query-key distance kept
#     within the trained length) retrieves the key.
# About 4 minutes on 2 cores (3 min 47 s measured beside another evaluation); a second run
# resumes (finished samples are kept in each run's predictions.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build needle  # the main job needs the needle binary only
./build/needle eval needle -m models/needle-tiny -o runs/main --lengths 1k,2k,4k,8k --depths 5 \
  --attention dense,sparse --init-tokens 64 --local-window 512 --block-size 64 --topk 8
echo "heatmaps: runs/main/heatmap_dense.png runs/main/heatmap_sparse.png"
./build/needle eval passkey -m models/needle-tiny -o runs/main_32k --lengths 32k --depths 3 \
  --attention dense,sparse --prefill sparse --pos-remap block --dense-layers 0 --select layer
