// The floors of bench_floors.h: an empty kernel and a streaming read, replayed from CUDA graphs.
#include "bench/bench_floors.h"

#include "engine/cuda/cuda_check.h"

namespace needle::bench {
namespace {

__global__ void EmptyKernel() {}

struct Part {
  const uint4* p;
  unsigned n;  // 16-byte words (< 2^32: 64 GiB)
};
constexpr int kMaxParts = 2;

// Every word of a part, 8 loads in flight per thread; the xor is written only when it equals a
// value it practically never takes, so the loads cannot be dropped.
__device__ __forceinline__ unsigned ReadPart(Part part) {
  unsigned x = 0;
  const unsigned stride = gridDim.x * blockDim.x;
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 7 * stride < part.n; i += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldcs(part.p + i + u * stride);
#pragma unroll
    for (int u = 0; u < 8; ++u) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < part.n; i += stride) {
    const uint4 v = __ldcs(part.p + i);
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  return x;
}
__global__ void __launch_bounds__(512) ReadKernel(Part a, Part b, unsigned* sink) {
  const unsigned x = ReadPart(a) ^ (b.n > 0 ? ReadPart(b) : 0u);
  if (x == 0x9e3779b9u) *sink = x;
}

unsigned* Sink() {
  static unsigned* sink = [] {
    unsigned* p = nullptr;
    NEEDLE_CUDA_CHECK(cudaMalloc(&p, sizeof(unsigned)));
    return p;
  }();
  return sink;
}

void LaunchRead(cudaStream_t stream, const std::vector<std::pair<const void*, size_t>>& parts) {
  if (parts.empty() || parts.size() > kMaxParts) Fail("ReadMs: 1 or 2 parts per launch");
  Part p[kMaxParts] = {};
  for (size_t i = 0; i < parts.size(); ++i)
    p[i] = Part{static_cast<const uint4*>(parts[i].first),
                static_cast<unsigned>(parts[i].second / 16)};
  int sms = 0, dev = 0;
  NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  ReadKernel<<<sms * 4, 512, 0, stream>>>(p[0], p[1], Sink());
  NEEDLE_CUDA_CHECK_LAUNCH();
}

}  // namespace

double EmptyLaunchUs(cudaStream_t stream, int nodes) {
  const double ms = GraphMedianMs(stream, 20, [&] {
    for (int i = 0; i < nodes; ++i) EmptyKernel<<<1, 32, 0, stream>>>();
  });
  return ms * 1e3 / nodes;
}

double ReadMs(cudaStream_t stream,
              const std::vector<std::vector<std::pair<const void*, size_t>>>& launches) {
  const double ms = GraphMedianMs(stream, 20, [&] {
    for (const auto& l : launches) LaunchRead(stream, l);
  });
  return ms / static_cast<double>(launches.size());
}

double ReadBandwidthGBs(cudaStream_t stream) {
  const size_t bytes = size_t{2} << 30;
  void* buf = nullptr;
  NEEDLE_CUDA_CHECK(cudaMalloc(&buf, bytes));
  NEEDLE_CUDA_CHECK(cudaMemset(buf, 1, bytes));
  NEEDLE_CUDA_CHECK(cudaDeviceSynchronize());
  const double ms = MedianMs(stream, 10, [&] { LaunchRead(stream, {{buf, bytes}}); });
  cudaFree(buf);
  return bytes / (ms * 1e-3) / 1e9;
}

}  // namespace needle::bench
