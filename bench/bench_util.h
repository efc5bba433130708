// Shared by the benchmarks: the machine's own ceilings, measured here rather than assumed.
#pragma once

#include <cstddef>

#include "engine/base/threading.h"

namespace needle::bench {

// Threads for benchmarks: $NEEDLE_BENCH_THREADS, else all hardware threads.
int BenchThreads();
ThreadingContext& BenchContext();

// DRAM read bandwidth in bytes/s with every thread of `tc` streaming a buffer far larger than
// the caches (best of several passes). Measured once and cached.
double MeasuredReadBandwidth();

// f32 multiply-add throughput in flop/s (2 per lane and instruction) with every thread of the
// benchmark context running 12 independent chains of the widest vectors (best of several
// passes): the cores' compute ceiling for f32 kernels. Measured once and cached.
double MeasuredFmaPeak();

}  // namespace needle::bench
