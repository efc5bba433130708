#include "engine/cuda/context_gather.h"

#include <cmath>

#include "engine/base/error.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"

namespace needle::cuda {
namespace {

constexpr int kGatherThreads = 256;
constexpr int kGatherUnroll = 4;  // 16-byte loads in flight per thread before its stores

// Block (i, kv): item i of K (kv 0) or V (kv 1). Reads cross PCIe, so each thread keeps
// kGatherUnroll loads in flight. Block (0, 0) also writes the table entries; i >= n: those alone.
__global__ void __launch_bounds__(kGatherThreads)
    GatherKernel(const uint4* k_src, const uint4* v_src, const int32_t* src, const int32_t* dst,
                 int64_t n, int64_t vecs, uint4* k_dst, uint4* v_dst, TableEntries e) {
  if (blockIdx.x == 0 && blockIdx.y == 0)
    for (int64_t x = threadIdx.x; x < e.rows * e.width; x += kGatherThreads)
      e.table[e.at != nullptr ? e.at[x] : (x / e.width) * e.stride + x % e.width] = e.values[x];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const uint4* s = (blockIdx.y == 0 ? k_src : v_src) + static_cast<int64_t>(src[i]) * vecs;
    uint4* d = (blockIdx.y == 0 ? k_dst : v_dst) + static_cast<int64_t>(dst[i]) * vecs;
    for (int64_t v0 = threadIdx.x; v0 < vecs; v0 += kGatherThreads * kGatherUnroll) {
      uint4 r[kGatherUnroll];
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t v = v0 + u * kGatherThreads;
        if (v < vecs) r[u] = s[v];
      }
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t v = v0 + u * kGatherThreads;
        if (v < vecs) d[v] = r[u];
      }
    }
  }
}

constexpr int kRotThreads = 256;

// Block (i, kv): item i of K (kv 0, rotated) or V (kv 1, copied). Each thread takes pairs
// (j, j + D/2) of rows, as RotateRows does, rounding every product and sum on its own so that the
// rotation matches the CPU's in f32.
__global__ void __launch_bounds__(kRotThreads)
    GatherRotateKernel(uint8_t* k, uint8_t* v, DType t, size_t es, const int32_t* src,
                       const int32_t* dst, const int32_t* rot, const float* rot_table, int64_t B,
                       int64_t D) {
  const int64_t i = blockIdx.x, per = B * D, half = D / 2;
  const int32_t r = rot[i];
  uint8_t* base = blockIdx.y == 0 ? k : v;
  const uint8_t* s = base + static_cast<size_t>(src[i] * per) * es;
  uint8_t* d = base + static_cast<size_t>(dst[i] * per) * es;
  if (blockIdx.y == 1 || r < 0) {
    for (int64_t e = threadIdx.x; e < per; e += kRotThreads) StoreAs(d, e, t, LoadAs(s, e, t));
    return;
  }
  const float* row = rot_table + static_cast<int64_t>(r) * D;
  for (int64_t e = threadIdx.x; e < B * half; e += kRotThreads) {
    const int64_t tok = e / half, j = e % half, o = tok * D;
    const float c = row[j], sn = row[half + j];
    const float x1 = LoadAs(s, o + j, t), x2 = LoadAs(s, o + half + j, t);
    StoreAs(d, o + j, t, __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, sn)));
    StoreAs(d, o + half + j, t, __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, sn)));
  }
  for (int64_t e = threadIdx.x; e < B * (D - 2 * half); e += kRotThreads) {
    const int64_t o = (e / (D - 2 * half)) * D + 2 * half + e % (D - 2 * half);
    StoreAs(d, o, t, LoadAs(s, o, t));
  }
}

constexpr int kStatThreads = 128;

// One score s into an online softmax's running (max m, sum l of exp(score - m)).
__device__ __forceinline__ void OnlineAdd(float s, float& m, float& l) {
  if (s > m) {
    l = l * expf(m - s) + 1.f;
    m = s;
  } else {
    l += expf(s - m);
  }
}

// Block (j, h, g): the online (max, sum) over the block's keys, each thread a strided share,
// then combined across the block.
__global__ void __launch_bounds__(kStatThreads)
    BlockStatsKernel(const float* q, const uint8_t* k, DType t, size_t es, int64_t n, int64_t Hk,
                     int64_t G, int64_t B, int64_t D, float scale, float* stats,
                     const int32_t* slots, int64_t slot_stride) {
  extern __shared__ float qs[];  // [D]
  __shared__ float red_m[kStatThreads], red_l[kStatThreads];
  const int64_t j = blockIdx.x, h = blockIdx.y, g = blockIdx.z;
  for (int64_t d = threadIdx.x; d < D; d += kStatThreads) qs[d] = q[(h * G + g) * D + d];
  __syncthreads();
  const int64_t s = slots != nullptr ? slots[h * slot_stride + j] : j;
  const uint8_t* rows = k + static_cast<size_t>((s * Hk + h) * B * D) * es;
  float m = -INFINITY, l = 0.f;
  for (int64_t r = threadIdx.x; r < B; r += kStatThreads) {
    const uint8_t* row = rows + static_cast<size_t>(r * D) * es;
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot = fmaf(qs[d], LoadAs(row, d, t), dot);
    OnlineAdd(dot * scale, m, l);
  }
  red_m[threadIdx.x] = m, red_l[threadIdx.x] = l;
  __syncthreads();
  for (int w = kStatThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      const float ma = red_m[threadIdx.x], mb = red_m[threadIdx.x + w];
      const float M = fmaxf(ma, mb);
      if (M != -INFINITY) {
        red_l[threadIdx.x] =
            red_l[threadIdx.x] * expf(ma - M) + red_l[threadIdx.x + w] * expf(mb - M);
        red_m[threadIdx.x] = M;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float* o = stats + ((h * n + j) * G + g) * 2;
    o[0] = red_m[0], o[1] = red_l[0];
  }
}

// Groups up to kWarpStatsG heads: block (j, h) of kWarpStatsWarps warps. The block's keys come
// into shared memory a chunk at a time (16-byte loads, all in flight at once), then each warp
// takes a strided share of the chunk's keys, one key at a time, its lanes across the channels
// (the dot products of every head of the group reduced across the warp); lane g keeps head g's
// online (max, sum); the warps' are combined at the end. (BlockStatsKernel, a thread per key,
// reads each key's channels one by one from DRAM: 65-100 us a layer for 32 blocks of
// Qwen2.5-7B's heads, the slowest of the device plan's phases.)
constexpr int kWarpStatsG = 16, kWarpStatsWarps = 8;
// (MG: the group size rounded up, 4, 8 or 16: the reductions of every head unrolled and
// interleaved; with a loop that stopped at G they ran one after the other, 28 us a layer for
// Qwen2.5-7B's heads on the H200, bench_plan_kernels.)
constexpr size_t kStatsChunk = 16384;  // bytes of keys in shared memory at a time

template <int MG>
__global__ void __launch_bounds__(32 * kWarpStatsWarps)
    BlockStatsWarpKernel(const float* q, const uint8_t* k, DType t, size_t es, int64_t n,
                         int64_t Hk, int G, int64_t B, int64_t D, float scale, float* stats,
                         const int32_t* slots, int64_t slot_stride) {
  extern __shared__ uint4 smem_stats[];  // keys [kStatsChunk bytes], then q [G][D] floats
  uint8_t* kbuf = reinterpret_cast<uint8_t*>(smem_stats);
  float* qs = reinterpret_cast<float*>(kbuf + kStatsChunk);
  __shared__ float red_m[kWarpStatsWarps][MG], red_l[kWarpStatsWarps][MG];
  const int64_t j = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x) qs[i] = q[h * G * D + i];
  const size_t row_bytes = static_cast<size_t>(D) * es;
  const int64_t chunk_rows = static_cast<int64_t>(kStatsChunk / row_bytes);
  const int64_t s = slots != nullptr ? slots[h * slot_stride + j] : j;
  const uint8_t* rows = k + static_cast<size_t>((s * Hk + h) * B) * row_bytes;
  float m = -INFINITY, l = 0.f;  // lane g < G: head g's
  for (int64_t r0 = 0; r0 < B; r0 += chunk_rows) {
    const int64_t cr = r0 + chunk_rows < B ? chunk_rows : B - r0;
    const uint4* src = reinterpret_cast<const uint4*>(rows + static_cast<size_t>(r0) * row_bytes);
    const int64_t vecs = static_cast<int64_t>(static_cast<size_t>(cr) * row_bytes / 16);
    __syncthreads();  // (the last chunk's keys are read; q is in)
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) smem_stats[v] = src[v];
    __syncthreads();
    for (int64_t r = warp; r < cr; r += kWarpStatsWarps) {
      const uint8_t* row = kbuf + static_cast<size_t>(r) * row_bytes;
      float dot[MG];
#pragma unroll
      for (int g = 0; g < MG; ++g) dot[g] = 0.f;
      for (int64_t d = lane; d < D; d += 32) {
        const float x = LoadAs(row, d, t);
#pragma unroll
        for (int g = 0; g < MG; ++g)
          if (g < G) dot[g] = fmaf(qs[g * D + d], x, dot[g]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < MG; ++g) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
      float mine = 0.f;
#pragma unroll
      for (int g = 0; g < MG; ++g)
        if (lane == g) mine = dot[g];
      if (lane < G) OnlineAdd(mine * scale, m, l);
    }
  }
  if (lane < G) red_m[warp][lane] = m, red_l[warp][lane] = l;
  __syncthreads();
  if (warp == 0 && lane < G) {
    float M = -INFINITY;
    for (int w = 0; w < kWarpStatsWarps; ++w) M = fmaxf(M, red_m[w][lane]);
    float L = 0.f;
    if (M != -INFINITY)
      for (int w = 0; w < kWarpStatsWarps; ++w)
        if (red_m[w][lane] != -INFINITY) L += red_l[w][lane] * expf(red_m[w][lane] - M);
    float* o = stats + ((h * n + j) * G + lane) * 2;
    o[0] = M, o[1] = L;
  }
}

// Block (row i's K or V = blockIdx.x, head = blockIdx.y): width bytes, 16 at a time where
// everything is 16-byte aligned.
__global__ void GatherRowsKernel(RowCopies c, size_t width, size_t pitch, uint8_t* dst) {
  const uint8_t* src = c.src[blockIdx.x] + blockIdx.y * pitch;
  uint8_t* to = dst + (static_cast<size_t>(blockIdx.x) * gridDim.y + blockIdx.y) * width;
  if ((width | reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(to)) % 16 == 0) {
    for (size_t i = threadIdx.x; i < width / 16; i += blockDim.x)
      reinterpret_cast<uint4*>(to)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else {
    for (size_t i = threadIdx.x; i < width; i += blockDim.x) to[i] = src[i];
  }
}

}  // namespace

void GatherRows(const RowCopies& c, size_t width, size_t pitch, int64_t heads, uint8_t* dst,
                cudaStream_t stream) {
  if (c.n <= 0) return;
  GatherRowsKernel<<<dim3(static_cast<unsigned>(2 * c.n), static_cast<unsigned>(heads)), 32, 0,
                     stream>>>(c, width, pitch, dst);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void GatherBlocks(const uint8_t* k_src, const uint8_t* v_src, const int32_t* src,
                  const int32_t* dst, int64_t n, size_t head_block_bytes, uint8_t* k_dst,
                  uint8_t* v_dst, cudaStream_t stream, const TableEntries& entries,
                  int max_blocks) {
  NEEDLE_CHECK(head_block_bytes % 16 == 0);
  const bool table = entries.rows > 0 && entries.width > 0;
  NEEDLE_CHECK(!table || (entries.values != nullptr && entries.table != nullptr &&
                          (entries.at != nullptr || entries.stride >= entries.width)));
  if (n <= 0 && !table) return;
  const int64_t vecs = static_cast<int64_t>(head_block_bytes / 16);
  const int64_t grid = n <= 0 ? 1 : max_blocks > 0 && max_blocks < n ? max_blocks : n;
  GatherKernel<<<dim3(static_cast<unsigned>(grid), n > 0 ? 2 : 1), kGatherThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(k_src), reinterpret_cast<const uint4*>(v_src), src, dst,
      n > 0 ? n : 0, vecs, reinterpret_cast<uint4*>(k_dst), reinterpret_cast<uint4*>(v_dst),
      table ? entries : TableEntries{});
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void PreloadGatherBlocks() {
  cudaFuncAttributes a{};
  NEEDLE_CUDA_CHECK(cudaFuncGetAttributes(&a, GatherKernel));
}

void GatherRotate(uint8_t* k, uint8_t* v, DType t, const int32_t* src, const int32_t* dst,
                  const int32_t* rot, const float* rot_table, int64_t n, int64_t B, int64_t D,
                  cudaStream_t stream) {
  if (n <= 0) return;
  GatherRotateKernel<<<dim3(static_cast<unsigned>(n), 2), kRotThreads, 0, stream>>>(
      k, v, t, DTypeSize(t), src, dst, rot, rot_table, B, D);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void BlockStats(const float* q, const uint8_t* k, DType t, int64_t n, int64_t kv_heads, int64_t G,
                int64_t B, int64_t D, float scale, float* stats, cudaStream_t stream,
                const int32_t* slots, int64_t slot_stride) {
  if (n <= 0) return;
  const size_t row_bytes = static_cast<size_t>(D) * DTypeSize(t);
  if (G <= kWarpStatsG && row_bytes % 16 == 0 && row_bytes <= kStatsChunk) {
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(kv_heads));
    const size_t smem = kStatsChunk + static_cast<size_t>(G * D) * sizeof(float);
    const auto launch = [&](auto kernel) {
      kernel<<<grid, 32 * kWarpStatsWarps, smem, stream>>>(q, k, t, DTypeSize(t), n, kv_heads,
                                                           static_cast<int>(G), B, D, scale, stats,
                                                           slots, slot_stride);
    };
    if (G <= 4)
      launch(BlockStatsWarpKernel<4>);
    else if (G <= 8)
      launch(BlockStatsWarpKernel<8>);
    else
      launch(BlockStatsWarpKernel<16>);
    NEEDLE_CUDA_CHECK_LAUNCH();
    return;
  }
  BlockStatsKernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(kv_heads),
                          static_cast<unsigned>(G)),
                     kStatThreads, static_cast<size_t>(D) * sizeof(float), stream>>>(
      q, k, t, DTypeSize(t), n, kv_heads, G, B, D, scale, stats, slots, slot_stride);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

}  // namespace needle::cuda
