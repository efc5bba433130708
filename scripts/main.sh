#!/usr/bin/env bash
# The main job: set up, build, and run the classic needle-in-a-haystack evaluation (the San
# Francisco needle in the Jargon File, swept over 5 depths at 1K-8K tokens) of the bundled model
# models/needle-tiny with dense and block-sparse attention side by side. Writes
# runs/main/summary.md (the table) and runs/main/heatmap_{dense,sparse}.{png,svg}. About 2
# minutes on 2 cores (1 min 57 s measured); a second run resumes (finished samples are kept in
# runs/main/predictions.jsonl).
#
# The sparse settings are scaled down to the model's short contexts so that sparse attention
# reads a small part of the cache: 64 initial tokens, a 512-token local window and the top 8
# blocks of 64 tokens (at most ~1.1K of the 8K tokens of the longest prompt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build needle  # the main job needs the needle binary only
./build/needle eval needle -m models/needle-tiny -o runs/main --lengths 1k,2k,4k,8k --depths 5 \
  --attention dense,sparse --init-tokens 64 --local-window 512 --block-size 64 --topk 8
echo "heatmaps: runs/main/heatmap_dense.png runs/main/heatmap_sparse.png"
