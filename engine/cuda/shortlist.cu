#include "engine/cuda/shortlist.h"

#include <cuda_bf16.h>

#include <algorithm>

#include "engine/cuda/cuda_check.h"
#include "engine/cuda/top_row.cuh"

namespace needle::cuda {
namespace {

constexpr int kThreads = 1024, kWarps = kThreads / 32;
// Items (block, KV head) a group of lanes has in flight: a warp loads per * kUnroll consecutive
// items (per = 32 / L items of L 16-byte pieces at a time) before it uses any.
constexpr int kUnroll = 8;
constexpr int kMaxQueryBytes = 32 << 10;  // (with top_row.cuh's: within the 48 KiB default)

struct Args {
  const float* q;             // [heads, D]
  const __nv_bfloat16* reps;  // the layer's [block][Hk][R][D]
  int G, Hk, D, R, n, want;   // group size, KV heads, head dim, representative rows
  int64_t first;              // block id of candidate 0
  int score_blocks;           // thread blocks that score (the grid may have more: >= rows)
  bool quest, sum;
  float *scores, *vals;  // [Hk][n]; [rows][want]
  int32_t* ids;          // [rows][want]
  unsigned* counters;    // [2]: arrivals, rows done
};

// Block b < score_blocks: the grouped queries into shared memory ([2][Hk][D], qa then qb: the
// sums of GroupQueriesKernel, bit for bit), then warp-steps of per * kUnroll items, each item's
// L lanes loading one 16-byte piece (8 channels of row e0 / D) and reducing across the L lanes.
// Every block then counts itself in; the last `rows` to arrive each wait for the count to reach
// the grid and find one row's top-k (TopRow) from the scores in L2. The grid is never larger
// than what the GPU holds at once, so the waiting blocks cannot keep any from starting.
__global__ void __launch_bounds__(kThreads, 1) ShortlistKernel(Args a) {
  extern __shared__ float sq[];
  const int HD = a.Hk * a.D, L = a.R * a.D / 8, per = 32 / L;
  const int lane = static_cast<int>(threadIdx.x & 31), sub = lane % L, slot = lane / L;
  const int e0 = sub * 8, qrow = e0 / a.D, d0 = e0 % a.D;  // (a piece never spans the rows)
  const int items = a.n * a.Hk, step_items = per * kUnroll;
  const int steps = (items + step_items - 1) / step_items;
  const int warps = a.score_blocks * kWarps;
  const uint4* base = reinterpret_cast<const uint4*>(a.reps + a.first * HD * a.R);
  if (static_cast<int>(blockIdx.x) < a.score_blocks) {
    int s = static_cast<int>(blockIdx.x) * kWarps + static_cast<int>(threadIdx.x / 32);
    uint4 v[kUnroll];
    const auto load = [&](int st) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int it = st * step_items + u * per + slot;
        if (it < items) v[u] = base[static_cast<int64_t>(it) * L + sub];
      }
    };
    if (s < steps) load(s);  // (the first loads in flight while the queries are summed)
    for (int i = static_cast<int>(threadIdx.x); i < HD; i += kThreads) {
      const int h = i / a.D, d = i % a.D;
      const float* qh = a.q + static_cast<int64_t>(h) * a.G * a.D + d;
      float x = 0.f, y = 0.f;
      for (int g = 0; g < a.G; ++g) {
        const float e = qh[static_cast<int64_t>(g) * a.D];
        if (!a.quest) {
          x = __fadd_rn(x, e);
        } else {
          x = __fadd_rn(x, fmaxf(e, 0.f));
          y = __fadd_rn(y, fminf(e, 0.f));
        }
      }
      sq[i] = x;
      sq[HD + i] = y;
    }
    __syncthreads();
    for (; s < steps; s += warps) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int it = s * step_items + u * per + slot;
        const bool in = it < items;
        const int h = in ? it % a.Hk : 0;
        const float4* qv = reinterpret_cast<const float4*>(sq + qrow * HD + h * a.D + d0);
        const float4 q0 = qv[0], q1 = qv[1];
        const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(&v[u]);
        float sc = 0.f;
        if (in) {
          const float2 x0 = __bfloat1622float2(x[0]), x1 = __bfloat1622float2(x[1]),
                       x2 = __bfloat1622float2(x[2]), x3 = __bfloat1622float2(x[3]);
          sc = q0.x * x0.x + q0.y * x0.y + q0.z * x1.x + q0.w * x1.y + q1.x * x2.x + q1.y * x2.y +
               q1.z * x3.x + q1.w * x3.y;
        }
        for (int o = L / 2; o > 0; o >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, o);
        if (in && sub == 0) a.scores[static_cast<int64_t>(h) * a.n + it / a.Hk] = sc;
      }
      if (s + warps < steps) load(s + warps);
    }
  }
  __threadfence();  // (this thread's scores, before the block counts itself in)
  __syncthreads();
  __shared__ unsigned s_ticket;
  if (threadIdx.x == 0) s_ticket = atomicAdd(&a.counters[0], 1u);
  __syncthreads();
  const unsigned grid = gridDim.x, rows = a.sum ? 1u : static_cast<unsigned>(a.Hk);
  if (s_ticket + rows < grid) return;
  if (threadIdx.x == 0) {
    while (atomicAdd(&a.counters[0], 0u) < grid) __nanosleep(32);
    __threadfence();
  }
  __syncthreads();
  TopRow(a.scores, a.Hk, a.n, a.sum, static_cast<int32_t>(a.first), a.want,
         static_cast<int64_t>(s_ticket - (grid - rows)), a.vals, a.ids);
  __syncthreads();
  // The last row done leaves the counters at zero for the next call (every waiting block has
  // seen the full count by then).
  if (threadIdx.x == 0 && atomicAdd(&a.counters[1], 1u) == rows - 1)
    a.counters[0] = 0, a.counters[1] = 0;
}

int ResidentBlocks() {  // the grid's bound: what every multiprocessor holds at once
  static const int n = [] {
    int dev = 0, sms = 0, per = 0;
    NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
    NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    NEEDLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, ShortlistKernel, kThreads,
                                                                    kMaxQueryBytes));
    return sms * std::max(per, 1);
  }();
  return n;
}

}  // namespace

bool FusedShortlist(const float* q, int64_t heads, int64_t kv_heads, int64_t D, bool quest,
                    const void* reps, DType storage, int64_t R, int64_t first, int64_t n,
                    bool sum_heads, int64_t want, float* scores, float* vals, int32_t* ids,
                    unsigned* counters, cudaStream_t stream) {
  if (n <= 0 || want <= 0) return true;
  const int64_t L = R * D / 8, rows = sum_heads ? 1 : kv_heads;
  if (storage != DType::kBF16 || kv_heads <= 0 || heads % kv_heads != 0 || (R * D) % 8 != 0 ||
      D % 8 != 0 || L <= 0 || L > 32 || 32 % L != 0 || (R != 1 && R != 2) ||
      n * kv_heads > INT32_MAX / 64 || first + n > INT32_MAX || want > INT32_MAX ||
      2 * kv_heads * D * 4 > kMaxQueryBytes || rows > ResidentBlocks() / 2)
    return false;
  const int64_t per = 32 / L, step_items = per * kUnroll;
  const int64_t steps = (n * kv_heads + step_items - 1) / step_items;
  const int score_blocks =
      static_cast<int>(std::min<int64_t>((steps + kWarps - 1) / kWarps, ResidentBlocks()));
  const int grid = static_cast<int>(std::max<int64_t>(score_blocks, rows));
  Args a{q,
         static_cast<const __nv_bfloat16*>(reps),
         static_cast<int>(heads / kv_heads),
         static_cast<int>(kv_heads),
         static_cast<int>(D),
         static_cast<int>(R),
         static_cast<int>(n),
         static_cast<int>(want),
         first,
         score_blocks,
         quest,
         sum_heads,
         scores,
         vals,
         ids,
         counters};
  ShortlistKernel<<<grid, kThreads, static_cast<size_t>(2 * kv_heads * D) * 4, stream>>>(a);
  NEEDLE_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace needle::cuda
