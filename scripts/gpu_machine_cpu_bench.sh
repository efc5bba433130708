#!/usr/bin/env bash
# Runs needle's CPU benchmarks on the GPU machine's 16-core CPU (which has no oneTBB/Highway
# packages): binaries and their shared libraries are built on the Debian machine and carried in
# .dev/gpu (see scripts/pack_for_device.sh). Writes logs under $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
P=.dev/gpu
export LD_LIBRARY_PATH=$PWD/$P/lib
OUT=${OUT:-/tmp/needle-out}
mkdir -p "$OUT"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|NUMA node\(s\)" | tee "$OUT/cpu.txt"
$P/bench_kernels --benchmark_min_time=0.5 2>&1 | tee "$OUT/bench_kernels.txt"
NEEDLE_BENCH_THREADS=8 $P/bench_kernels --benchmark_filter=MatVec --benchmark_min_time=0.5 2>&1 | tee "$OUT/bench_kernels_8t.txt"
$P/bench_decode 2>&1 | tee "$OUT/bench_decode.txt"
# Real safetensors files at Qwen2.5-7B shapes: load time, memory, decode speed.
PROMPT=$(seq -s, 10 41)
python3 scripts/make_random_hf_model.py --config bench/configs/qwen2.5-7b.json --out /tmp/q7 \
  --greedy-prompt "$PROMPT" --greedy-new 8 2>&1 | grep -v Warning | tee "$OUT/hf_model.txt"
# Wall time and peak resident memory of a command (no /usr/bin/time there).
timed() {
  python3 -c 'import resource, subprocess, sys, time
t = time.time(); rc = subprocess.run(sys.argv[1:]).returncode
print(f"[{sys.argv[2]}] rc {rc}, {time.time() - t:.2f} s wall, max RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB", flush=True)' "$@"
}
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo "page cache dropped" || echo "page cache not dropped"
timed $P/needle info -m /tmp/q7 2>&1 | tee "$OUT/load.txt"
timed $P/needle generate -m /tmp/q7 --prompt-ids "$PROMPT" -n 8 2>&1 | tee -a "$OUT/load.txt"
timed $P/needle generate -m /tmp/q7 --prompt-ids "$PROMPT" -n 8 2>&1 | tee -a "$OUT/load.txt"
