#!/usr/bin/env bash
# scripts/plan_overlap.py on a plan whose overlaps are counted by hand (exit 77 = skipped, with
# the reason, without python3), and its errors for a missing file and a line that is not JSON.
set -uo pipefail
command -v python3 > /dev/null || { echo "skipped: python3 not installed"; exit 77; }
S="$(dirname "$0")/../scripts/plan_overlap.py"
d=$(mktemp -d) && trap 'rm -rf "$d"' EXIT
cat > "$d/plan.jsonl" <<'JSON'
{"step":0,"layer":0,"pos":9,"dense":true}
{"step":0,"layer":2,"dense":false,"candidates":9,"blocks":[[1,2,3,4],[5,6,7,8]]}
{"step":1,"layer":2,"dense":false,"candidates":9,"blocks":[[1,2,3,9],[5,6,10,11]]}
{"step":2,"layer":2,"dense":false,"candidates":9,"blocks":[[1,2,4,9],[5,7,10,12]]}
JSON
fail=0
expect() {  # what, want, command...
  local what=$1 want=$2; shift 2
  local got; got=$("$@" 2>&1)
  if [[ "$got" != *"$want"* ]]; then echo "FAIL $what: got '$got', want '$want'"; fail=1; fi
}
# Step 1 shares 3 and 2 blocks with step 0, step 2 3 and 2 with step 1; a cache of every block
# holds 3, 2 then 4, 3 (fewest: 2, 3); with 4 slots 3, 2 then 3, 2 (4 and 7 made way).
expect "64 slots" "layer 2: 9 candidates, 3 steps, 4 blocks a head; shared with the step before 2.5 (fewest of any head 2.0); held by 64 slots, fewest of any head 2.5" python3 "$S" "$d/plan.jsonl"
expect "4 slots" "held by 4 slots, fewest of any head 2.0" python3 "$S" "$d/plan.jsonl" --slots 4
expect "missing" "$d/none.jsonl: No such file or directory" python3 "$S" "$d/none.jsonl"
echo '{"step":' > "$d/bad.jsonl"
expect "not JSON" "$d/bad.jsonl:1: not JSON" python3 "$S" "$d/bad.jsonl"
python3 "$S" "$d/bad.jsonl" > /dev/null 2>&1 && { echo "FAIL: exit 0 on a bad file"; fail=1; }
[ $fail = 0 ] && echo "plan_overlap: all passed"
exit $fail
