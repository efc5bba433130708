#!/usr/bin/env bash
# Copies the built binaries (of build/, or the build folder given as $1) and the Debian shared libraries they need into .dev/gpu, a
# git-ignored folder that the device tool carries to the GPU machine (which lacks those packages).
set -euo pipefail
cd "$(dirname "$0")/.."
P=.dev/gpu
rm -rf $P && mkdir -p $P/lib
B=${1:-build}
cp $B/needle $B/tests/needle_tests $( [ -f $B/bench/bench_cuda ] && echo $B/bench/bench_cuda $B/bench/bench_hybrid $B/bench/bench_plan_kernels ) $B/bench/bench_kernels $B/bench/bench_decode $B/bench/bench_sparse $B/bench/bench_batch $P/
# Every Debian library the binaries link that is not part of a bare Ubuntu (libc, libstdc++,
# libgcc, libm) nor of the GPU machine's own CUDA 13 (/usr/local/cuda: run there with
# LD_LIBRARY_PATH=$PWD/.dev/gpu/lib:/usr/local/cuda/lib64), found with ldd rather than listed.
for b in $P/needle $P/needle_tests $P/bench_*; do
  ldd "$b" | awk '/=> \//{print $3}'
done | sort -u | grep -Ev '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so|^/usr/local/cuda' | while read -r lib; do
  cp -L "$lib" $P/lib/
done
# The Debian data files the dataset generators read (RULER's WordNet word lists, the essay
# haystack), which the GPU machine lacks: needle eval ... --wordnet $P/share
# --haystack $P/share/jargon.txt.gz there.
mkdir -p $P/share
cp /usr/share/wordnet/index.adj /usr/share/wordnet/index.noun /usr/share/doc/jargon-text/jargon.txt.gz \
  $P/share/ 2>/dev/null || echo "pack_for_device.sh: wordnet-base / jargon-text missing: RULER tasks will not generate there" >&2
du -sh $P
