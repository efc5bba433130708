#!/usr/bin/env bash
# Copies the built binaries and the Debian shared libraries they need into .dev/gpu, a
# git-ignored folder that the device tool carries to the GPU machine (which lacks those packages).
set -euo pipefail
cd "$(dirname "$0")/.."
P=.dev/gpu
rm -rf $P && mkdir -p $P/lib
cp build/needle build/bench/bench_kernels build/bench/bench_decode build/bench/bench_sparse $P/
# Every Debian library the binaries link that is not part of a bare Ubuntu (libc, libstdc++,
# libgcc, libm), found with ldd rather than listed by hand.
for b in $P/needle $P/bench_*; do
  ldd "$b" | awk '/=> \//{print $3}'
done | sort -u | grep -Ev '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' | while read -r lib; do
  cp -L "$lib" $P/lib/
done
du -sh $P
