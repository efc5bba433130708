// Timing on the GPU for the CUDA benchmarks (bench_cuda.cc), and what the GPU itself allows
// them, measured with trivial kernels: the cost of a launch that does nothing, and of reading the
// same bytes as a decode call in one launch. A decode call over a short cache cannot beat the
// second: its time there is latency (launch, the first loads, the tail), not bandwidth.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

#include "engine/cuda/cuda_check.h"

namespace needle::bench {

// Median milliseconds of f() between two events on `stream` (after one warm-up call). The
// events go on the work's stream: on the default stream they would not wait for a non-blocking
// stream's kernels.
template <typename F>
double MedianMs(cudaStream_t stream, int reps, F&& f) {
  cudaEvent_t a, b;
  NEEDLE_CUDA_CHECK(cudaEventCreate(&a));
  NEEDLE_CUDA_CHECK(cudaEventCreate(&b));
  f();
  NEEDLE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    NEEDLE_CUDA_CHECK(cudaEventRecord(a, stream));
    f();
    NEEDLE_CUDA_CHECK(cudaEventRecord(b, stream));
    NEEDLE_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    NEEDLE_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Median milliseconds of one replay of a CUDA graph captured from f() on `stream`. f() runs once
// before the capture, so that scratch buffers have grown (no allocation while capturing).
template <typename F>
double GraphMedianMs(cudaStream_t stream, int reps, F&& f) {
  f();
  NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  NEEDLE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  f();
  NEEDLE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  NEEDLE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double ms =
      MedianMs(stream, reps, [&] { NEEDLE_CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ms;
}

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
