// What the GPU itself allows the attention benchmarks (bench_cuda.cc), measured with trivial
// kernels: the cost of a launch that does nothing, and of reading the same bytes as a decode
// call in one launch. A decode call over a short cache cannot beat the second: its time there is
// latency (launch, the first loads, the tail), not bandwidth.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>
#include <vector>

namespace needle::bench {

// Median microseconds per node of a CUDA graph of `nodes` empty kernels, one after another.
double EmptyLaunchUs(cudaStream_t stream, int nodes);

// Median milliseconds per launch of a graph that reads every byte of parts[i] (pointer, bytes;
// 16-byte aligned, a multiple of 16 bytes) for each i in `launches` in turn, one launch per inner
// vector: e.g. K and V of one layer per launch.
double ReadMs(cudaStream_t stream,
              const std::vector<std::vector<std::pair<const void*, size_t>>>& launches);

// Read-only bandwidth in GB/s: one launch reading a 2 GiB buffer (median of 10).
double ReadBandwidthGBs(cudaStream_t stream);

}  // namespace needle::bench
