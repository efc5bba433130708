#!/usr/bin/env bash
# needle eval's wall time, one sample at a time against N at once (issue 19): needle-tiny, eight
# tasks x 20 samples at 16K (InfiniteBench's tasks as 20 depths, RULER's as 20 samples), dense
# attention, every task one needle eval command (model loading included), each configuration's
# answers compared. Prints one JSON object per task and batch, then the totals.
# Usage: [GROUPED=1] bash bench/bench_eval_batch.sh NEEDLE OUT N [EXTRA eval options...]
#   (GPU machine: EXTRA = --device cuda --wordnet .dev/gpu/share --haystack
#    .dev/gpu/share/jargon.txt.gz)
set -euo pipefail
NEEDLE=$1 OUT=$2 N=$3
LENGTH=${LENGTH:-16k} SAMPLES=${SAMPLES:-20}  # (smaller for a quick check)
shift 3
TASKS=(passkey number_string kv_retrieval niah_single_1 niah_single_2 niah_single_3
       niah_multikey_1 niah_multivalue)
# GROUPED=1: one command for the InfiniteBench tasks and one for RULER's (needle eval TASK,TASK...:
# the model loads once per command), instead of one a task.
IB=passkey,number_string,kv_retrieval
RULER=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue
if [ "${GROUPED:-0}" = 1 ]; then COMMANDS=("$IB" "$RULER"); else COMMANDS=("${TASKS[@]}"); fi
declare -A total
for b in 1 "$N"; do
  total[$b]=0
  for c in "${COMMANDS[@]}"; do
    case $c in passkey* | number_string* | kv_retrieval*) n=(--depths "$SAMPLES") ;; *) n=(--samples "$SAMPLES") ;; esac
    [ "$c" = "${c%,*}" ] && dir=$OUT/b$b/$c || dir=$OUT/b$b/group_${c%%,*}
    rm -rf "$dir" && mkdir -p "$OUT/b$b"
    s=$(date +%s.%N)
    "$NEEDLE" eval "$c" -m models/needle-tiny --lengths "$LENGTH" "${n[@]}" --batch "$b" \
      -o "$dir" "$@" >"$dir.log" 2>&1 || { tail -3 "$dir.log"; exit 1; }
    w=$(python3 -c "print(round($(date +%s.%N) - $s, 3))")
    total[$b]=$(python3 -c "print(round(${total[$b]} + $w, 3))")
    for t in ${c//,/ }; do
      [ "$c" = "$t" ] || ln -sfn "group_${c%%,*}/$t" "$OUT/b$b/$t"
      acc=$(grep -m1 "^| $t |" "$OUT/b$b/$t/summary.md" | cut -d'|' -f6 | tr -d ' ')
      # The samples' prefill seconds as each reported them (prompt tokens / prefill tok/s): where
      # the wall time goes, next to start-up, sample generation and decode.
      pre=$(python3 -c "import json,sys; print(round(sum(r['prompt_tokens'] / r['prefill_tok_s'] for r in map(json.loads, open(sys.argv[1])) if r.get('prefill_tok_s')), 3))" "$OUT/b$b/$t/predictions.jsonl")
      echo "{\"bench\": \"eval_batch\", \"task\": \"$t\", \"command\": \"$c\", \"batch\": $b, \"wall_s\": $w, \"prefill_s\": $pre, \"accuracy\": $acc}"
    done
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
