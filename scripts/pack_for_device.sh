#!/usr/bin/env bash
# Copies the built binaries and the Debian shared libraries they need into .dev/gpu, a
# git-ignored folder that the device tool carries to the GPU machine (which lacks those packages).
set -euo pipefail
cd "$(dirname "$0")/.."
P=.dev/gpu
rm -rf $P && mkdir -p $P/lib
cp build/needle build/bench/bench_kernels build/bench/bench_decode build/bench/bench_sparse $P/
for lib in libtbb.so.12 libhwy.so.1 libbenchmark.so.1debian; do
  cp -L "/lib/x86_64-linux-gnu/$lib" $P/lib/
done
du -sh $P
