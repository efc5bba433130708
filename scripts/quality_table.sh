#!/usr/bin/env bash
# needle-tiny's quality table beyond its trained length (issue 24): tasks x lengths with sparse
# attention, sparse chunked prefill and block-wise position remapping (and dense, where asked),
# each task's samples sharded over local processes (needle eval --shard I/N, one process per
# THREADS cores) and merged (needle eval merge). A killed run resumes: every shard's finished
# samples are kept in OUT/TASK/shard_I/predictions.jsonl.
#   bash scripts/quality_table.sh OUT [LENGTHS] [SAMPLES] [TASKS] [ATTENTION]
#     LENGTHS   default 16k,32k,64k,128k
#     SAMPLES   samples per (task, length) (default 8): InfiniteBench tasks and the classic
#               needle as SAMPLES depths (the needle's samples at one depth are all alike), RULER
#               as SAMPLES samples
#     TASKS     default passkey,number_string,kv_retrieval,niah_single_1,niah_single_2,
#               niah_single_3,niah_multikey_1,niah_multivalue,needle
#     ATTENTION sparse (default), dense,sparse or dense (dense prefill is quadratic: keep it short)
#   Environment: PROCS (processes, default nproc / THREADS), THREADS (per process, default 4, or
#   nproc when smaller), NEEDLE (binary, default build/needle), EXTRA (more eval options). On
#   the GPU machine (scripts/pack_for_device.sh): NEEDLE=.dev/gpu/needle EXTRA="--device cpu
#   --wordnet .dev/gpu/share --haystack .dev/gpu/share/jargon.txt.gz" (it lacks those packages).
# Writes OUT/table.md: one row per (task, length, configuration), and each task's merged run in
# OUT/TASK/merged (predictions.jsonl, summary.md, heatmaps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/quality_table.sh OUT [LENGTHS] [SAMPLES] [TASKS] [ATTENTION]}
LENGTHS=${2:-16k,32k,64k,128k}
SAMPLES=${3:-8}
TASKS=${4:-passkey,number_string,kv_retrieval,niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,needle}
ATTENTION=${5:-sparse}
NEEDLE=${NEEDLE:-build/needle}
CORES=$(nproc)
THREADS=${THREADS:-$((CORES < 4 ? CORES : 4))}
PROCS=${PROCS:-$((CORES / THREADS > 0 ? CORES / THREADS : 1))}
[ -x "$NEEDLE" ] || { echo "quality_table.sh: no $NEEDLE (bash scripts/setup.sh build needle)" >&2; exit 1; }
# The longest length, plus room for the answer, is the context limit (needle cuts nothing).
MAXLEN=0
for l in ${LENGTHS//,/ }; do
  case "$l" in
    *[kK]) n=$((${l%?} * 1024)) ;;
    *[mM]) n=$((${l%?} * 1048576)) ;;
    *) n=$l ;;
  esac
  [ "$n" -gt "$MAXLEN" ] && MAXLEN=$n
done
CTX=$((MAXLEN + MAXLEN / 16 + 1024))
SPARSE=(--dense-layers 0 --select layer --prefill sparse --pos-remap block)
case "$ATTENTION" in *sparse*) ;; *) SPARSE=() ;; esac  # (dense alone: no sparse settings)
mkdir -p "$OUT"
echo "quality_table: tasks $TASKS, lengths $LENGTHS, $SAMPLES samples, $ATTENTION; $PROCS processes x $THREADS threads" >&2
for task in ${TASKS//,/ }; do
  case "$task" in
    passkey | number_string | kv_retrieval | needle) PER=(--depths "$SAMPLES" --samples 1) ;;
    *) PER=(--samples "$SAMPLES") ;;
  esac
  pids=()
  mkdir -p "$OUT/$task"
  for ((i = 0; i < PROCS; i++)); do
    "$NEEDLE" eval "$task" -o "$OUT/$task/shard_$i" --shard "$i/$PROCS" -t "$THREADS" \
      --lengths "$LENGTHS" "${PER[@]}" -c "$CTX" --attention "$ATTENTION" "${SPARSE[@]}" \
      ${EXTRA:-} >"$OUT/$task/log_$i.out" 2>"$OUT/$task/log_$i.err" &
    pids+=($!)
  done
  failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  if [ "$failed" = 1 ]; then
    echo "quality_table: $task failed; see $OUT/$task/log_*.err" >&2
    tail -n 3 "$OUT/$task"/log_*.err >&2
    exit 1
  fi
  rm -rf "$OUT/$task/merged"
  "$NEEDLE" eval merge "$OUT/$task"/shard_[0-9]* -o "$OUT/$task/merged" >/dev/null
  echo "quality_table: $task done" >&2
done
{
  echo "| task | length | configuration | samples | accuracy | prefill tok/s | decode tok/s | recall |"
  echo "|---|---|---|---|---|---|---|---|"
  for task in ${TASKS//,/ }; do tail -n +3 "$OUT/$task/merged/summary.md"; done
} >"$OUT/table.md"
cat "$OUT/table.md"
