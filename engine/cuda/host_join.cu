#include "engine/cuda/host_join.h"

#include "engine/cuda/cuda_check.h"

namespace needle::cuda {
namespace {

__device__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ uint32_t LoadAcquireSys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ uint64_t LoadRelaxedSys64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__global__ void JoinHostKernel(HostJoin j) {
  if (threadIdx.x == 0) {
    const uint64_t t0 = GlobalTimerNs();
    while (static_cast<int32_t>(LoadAcquireSys(j.flag) - j.want) < 0) {
      if (GlobalTimerNs() - t0 > kHostJoinTimeoutNs) {
        *reinterpret_cast<volatile uint32_t*>(j.timed_out) = j.want;
        break;
      }
      __nanosleep(128);
    }
    if (j.sums_ns != nullptr) {
      const uint64_t t1 = GlobalTimerNs();
      // (The host's two stamps, loaded together: after the flag's acquire, they are this step's.)
      const uint64_t seen = LoadRelaxedSys64(j.clock + HandshakeClock::kSeen),
                     done = LoadRelaxedSys64(j.clock + HandshakeClock::kDone);
      uint64_t* acc = j.sums_ns;  // (device memory: this kernel alone, one at a time, writes it)
      const uint64_t post = *j.post;
      acc[HandshakeSums::kIdle] += t1 - t0;
      // (Post wrote the selection's flag; the host's part inside the GPU's span, as it is but
      // for the clocks' rates.)
      if (post != 0 && seen != 0 && done >= seen && t1 - post >= done - seen) {
        acc[HandshakeSums::kSpan] += t1 - post;
        acc[HandshakeSums::kHost] += done - seen;
        const uint64_t to_host = seen - post, to_gpu = t1 - done, n = acc[HandshakeSums::kCount];
        acc[HandshakeSums::kToHost] += to_host;
        acc[HandshakeSums::kToGpu] += to_gpu;
        acc[HandshakeSums::kCount] = n + 1;
        const auto less = [](uint64_t a, uint64_t b) {
          return static_cast<int64_t>(a) < static_cast<int64_t>(b);
        };
        if (n == 0 || less(to_host, acc[HandshakeSums::kMinToHost]))
          acc[HandshakeSums::kMinToHost] = to_host;
        if (n == 0 || less(to_gpu, acc[HandshakeSums::kMinToGpu]))
          acc[HandshakeSums::kMinToGpu] = to_gpu;
      }
    }
  }
  __syncthreads();
  if (j.cpu_sums == nullptr) return;
  const int64_t w = j.G * 2, Hk = j.kv_heads, n = j.n_sel;
  const int32_t* counts = j.cpu + Hk * n;
  int64_t off = 0;  // the head's first block in cpu_sums
  for (int64_t h = 0; h < Hk; ++h) {
    const int64_t cnt = counts[h];
    for (int64_t x = threadIdx.x; x < cnt * w; x += blockDim.x) {
      const int64_t i = x / w, f = x % w, at = j.cpu[h * n + i];
      j.sums[(h * n + at) * j.tiles * w + f] = j.cpu_sums[(off + i) * w + f];
    }
    off += cnt;
  }
}

__global__ void PostKernel(PostToHost p) {
  for (const auto& r : p.r)
    for (int64_t i = threadIdx.x; i < r.words; i += blockDim.x) r.dst[i] = r.src[i];
  __threadfence_system();  // (each thread's writes before the flag)
  __syncthreads();
  if (threadIdx.x == 0) {
    if (p.stamp != nullptr) *p.stamp = GlobalTimerNs();
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p.flag), "r"(p.value) : "memory");
  }
}

}  // namespace

void PreloadHostJoin() {
  cudaFuncAttributes a{};
  NEEDLE_CUDA_CHECK(cudaFuncGetAttributes(&a, JoinHostKernel));
  NEEDLE_CUDA_CHECK(cudaFuncGetAttributes(&a, PostKernel));
}

void Post(const PostToHost& p, cudaStream_t stream) {
  PostKernel<<<1, 256, 0, stream>>>(p);
  NEEDLE_CUDA_CHECK(cudaGetLastError());
}

void JoinHost(const HostJoin& j, cudaStream_t stream) {
  JoinHostKernel<<<1, 128, 0, stream>>>(j);
  NEEDLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace needle::cuda
