#!/usr/bin/env bash
# needle eval's wall time, one sample at a time against N at once (issue 19): needle-tiny, eight
# tasks x 20 samples at 16K (InfiniteBench's tasks as 20 depths, RULER's as 20 samples), dense
# attention, every task one needle eval command (model loading included), each configuration's
# answers compared. Prints one JSON object per task and batch, then the totals.
# Usage: bash bench/bench_eval_batch.sh NEEDLE OUT N [EXTRA eval options...]
#   (GPU machine: EXTRA = --device cuda --wordnet .dev/gpu/share --haystack
#    .dev/gpu/share/jargon.txt.gz)
set -euo pipefail
NEEDLE=$1 OUT=$2 N=$3
LENGTH=${LENGTH:-16k} SAMPLES=${SAMPLES:-20}  # (smaller for a quick check)
shift 3
TASKS=(passkey number_string kv_retrieval niah_single_1 niah_single_2 niah_single_3
       niah_multikey_1 niah_multivalue)
declare -A total
for b in 1 "$N"; do
  total[$b]=0
  for t in "${TASKS[@]}"; do
    case $t in passkey | number_string | kv_retrieval) n=(--depths "$SAMPLES") ;; *) n=(--samples "$SAMPLES") ;; esac
    rm -rf "$OUT/b$b/$t"
    s=$(date +%s.%N)
    "$NEEDLE" eval "$t" -m models/needle-tiny --lengths "$LENGTH" "${n[@]}" --batch "$b" \
      -o "$OUT/b$b/$t" "$@" >"$OUT/b$b.$t.log" 2>&1 || { tail -3 "$OUT/b$b.$t.log"; exit 1; }
    w=$(python3 -c "print(round($(date +%s.%N) - $s, 3))")
    total[$b]=$(python3 -c "print(round(${total[$b]} + $w, 3))")
    acc=$(grep -m1 "^| $t |" "$OUT/b$b/$t/summary.md" | cut -d'|' -f6 | tr -d ' ')
    echo "{\"bench\": \"eval_batch\", \"task\": \"$t\", \"batch\": $b, \"wall_s\": $w, \"accuracy\": $acc}"
  done
done
# A run's answers, sample by sample, in one order.
Answers() {
  python3 -c "import json,sys; print(sorted((r['id'], r['prediction']) for r in map(json.loads, open(sys.argv[1]))))" "$1"
}
same=0 differ=0
for t in "${TASKS[@]}"; do
  if cmp -s <(Answers "$OUT/b1/$t/predictions.jsonl") <(Answers "$OUT/b$N/$t/predictions.jsonl"); then
    same=$((same + 1))
  else
    differ=$((differ + 1))
  fi
done
echo "{\"bench\": \"eval_batch_total\", \"batch_1_s\": ${total[1]}, \"batch_${N}_s\": ${total[$N]}, \"speedup\": $(python3 -c "print(round(${total[1]} / ${total[$N]}, 2))"), \"tasks_same_answers\": $same, \"tasks_differing\": $differ}"
