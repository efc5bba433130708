// Timing on the GPU for the CUDA benchmarks (bench_cuda.cc), and what the GPU itself allows
// them, measured with trivial kernels: the cost of a launch that does nothing, and of reading the
// same bytes as a decode call in one launch. A decode call over a short cache cannot beat the
// second: its time there is latency (launch, the first loads, the tail), not bandwidth.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
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

// One layer of a 16-bit paged cache with head_dim 128 (KVLayerView's k, v and device table).
struct FloorLayer {
  const void* k;
  const void* v;
  const int32_t* table;
};
// Milliseconds per layer of the parts of a decode call over n_keys keys, each one launch per layer
// in a graph with the TMA decode kernel's grid (bench_decode_floors.cu), no products:
//   stream:  every block streams its tiles with the copy engine, rows found without the table;
//   paged:   the same, each tile's slot looked up in the block table first;
//   paged_shared: paged with layer 0's table for every layer (equal contents here), which then
//            stays in L2 from one layer to the next;
//   merge:   paged, then each block writes a partial and the last block of a KV head merges them
//            (decode_merge.cuh, as the decode kernels do); merge_sc: the same with the fifth
//            session's arrival (sequentially consistent fences around a relaxed atomic);
//   cluster: paged, then the splits of a KV head, one cluster, merge through distributed shared
//            memory; 0 when splits > 16. max_clusters: such clusters resident at once.
// All zero on GPUs before compute capability 9.0 (no copy engine).
// splits: 0 for the TMA kernel's choice (sm_count / kv_heads); otherwise that many, and only
// paged and cluster are measured.
struct DecodeFloors {
  int splits = 0, max_clusters = 0;
  double stream_ms = 0, paged_ms = 0, paged_shared_ms = 0, merge_sc_ms = 0, merge_ms = 0,
         cluster_ms = 0;
};
DecodeFloors DecodeFloorsMs(cudaStream_t stream, const std::vector<FloorLayer>& layers,
                            int64_t n_keys, int B, int kv_heads, int G, int splits = 0);

}  // namespace needle::bench
