#!/usr/bin/env bash
# The Slurm path of sharded evaluation, for real (issue 19): starts a one-node Slurm cluster of
# its own (munged, slurmctld and slurmd from Debian's slurm-wlm, in a temporary folder, on free
# ports, as the current user), submits a 4-task array job of `needle eval` on the bundled
# needle-tiny through scripts/slurm_eval.sbatch, waits for it, merges the slices with `needle eval
# merge` and compares the answers with one process's run of the same evaluation.
#   bash scripts/test_slurm.sh [NEEDLE_BINARY]     (ctest runs it as slurm_array_eval)
# Exit 0: passed; 77: skipped, with the reason (Slurm not installed, or its daemons cannot start on
# this machine); anything else: failed.
set -uo pipefail
cd "$(dirname "$0")/.."
NEEDLE=$(readlink -f "${1:-build/needle}")
skip() { echo "SKIP: $*"; exit 77; }
fail() { echo "FAIL: $*"; [ -n "${T:-}" ] && tail -n 20 "$T"/*.log 2>/dev/null; exit 1; }
for b in munged slurmctld slurmd sbatch sinfo; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] ||
    skip "$b not installed (Debian: apt-get install slurm-wlm munge)"
done
PATH="$PATH:/usr/sbin"
[ -x "$NEEDLE" ] || fail "no needle binary at $NEEDLE"

T=$(mktemp -d /tmp/needle-slurm.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -f "$T/munge/munged.pid" ] && kill "$(cat "$T/munge/munged.pid")" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT
ME=$(id -un)
NODE=$(hostname -s)
# Ports of our own: random in 20000-59999, not ones a listener holds.
free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 40000))
    ss -ltn 2>/dev/null | grep -q ":$p " || { echo "$p"; return; }
  done
  echo "$p"
}
CTLD_PORT=$(free_port)
SLURMD_PORT=$((CTLD_PORT + 1))
mkdir -p "$T/state" "$T/spool" "$T/munge"
chmod 700 "$T/munge"

# munge: a key and a daemon of our own, on our own socket.
dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$T/munge/munge.key"
munged --force --key-file="$T/munge/munge.key" --socket="$T/munge/munge.sock" \
  --pid-file="$T/munge/munged.pid" --log-file="$T/munged.log" --seed-file="$T/munge/seed" \
  >"$T/munged.out.log" 2>&1 || skip "munged does not start here: $(tail -n 3 "$T"/munged*.log | tr '\n' ' ')"

cat >"$T/slurm.conf" <<EOF
ClusterName=needle-test
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$ME
SlurmdUser=$ME
AuthType=auth/munge
AuthInfo=socket=$T/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName=$NODE CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$T/slurm.conf"
slurmctld -D -f "$SLURM_CONF" >"$T/slurmctld.out.log" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" -N "$NODE" >"$T/slurmd.out.log" 2>&1 &
PIDS+=($!)
up=0
for _ in $(seq 60); do
  if sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then up=1; break; fi
  for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || skip "a Slurm daemon exited on start: $(tail -n 3 "$T"/slurm*.log | tr '\n' ' ')"; done
  sleep 0.5
done
[ "$up" = 1 ] || skip "the Slurm node did not come up in 30 s: $(sinfo 2>&1 | tail -n 2 | tr '\n' ' ')"

# The evaluation: needle-tiny, passkey at two lengths, dense and sparse, 8 samples.
ARGS=(--lengths 1k,2k --depths 2 --samples 2 --attention dense,sparse)
"$NEEDLE" eval passkey -o "$T/one" -t 1 "${ARGS[@]}" >"$T/one.log" 2>&1 || fail "single run"
NEEDLE="$NEEDLE" timeout 600 sbatch --wait --array=0-3 -c 1 -o "$T/task-%a.log" \
  scripts/slurm_eval.sbatch passkey "$T/run" "${ARGS[@]}" >"$T/sbatch.log" 2>&1 ||
  fail "the array job failed: $(cat "$T/sbatch.log"; tail -n 5 "$T"/task-*.log)"
grep -h "needle: shard" "$T"/task-*.log
"$NEEDLE" eval merge "$T"/run/shard_* -o "$T/merged" >"$T/merge.log" 2>&1 ||
  fail "merge: $(cat "$T/merge.log")"
answers() { sed -E 's/"(prefill|decode)_tok_s":[-0-9.e+]+,?//g' "$1/predictions.jsonl" | sort; }
if ! diff <(answers "$T/one") <(answers "$T/merged") >"$T/diff.log"; then
  fail "the merged shards differ from one process: $(head -n 5 "$T/diff.log")"
fi
n=$(wc -l <"$T/merged/predictions.jsonl")
[ "$n" = 16 ] || fail "expected 16 results (2 configurations x 8 samples), merged $n"
echo "PASS: a 4-task Slurm array of needle eval, merged, answers as one process ($n results)"
