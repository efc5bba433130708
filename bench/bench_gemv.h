// The decode GEMV's tilings on real model shapes (bench_gemv.cu), for bench_cuda.
#pragma once

#include <cuda_runtime.h>

namespace needle::bench {

// Prints one {"bench":"gemv"} JSON line per shape and tiling; copy_gbs: the measured copy
// bandwidth the fractions are taken of.
void GemvSweep(cudaStream_t stream, double copy_gbs);

}  // namespace needle::bench
