// Element-wise kernels of the CUDA backend; see kernels.h for shapes.
#include "engine/cuda/kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "engine/base/error.h"
#include "engine/cuda/block_select.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"
#include "engine/cuda/l2_policy.cuh"
#include "engine/cuda/pdl.cuh"

namespace needle::cuda {
namespace {

constexpr int kThreads = 256;

unsigned Blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__global__ void EmbedKernel(const void* table, DType dt, const int32_t* ids, int64_t T, int64_t H,
                            float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= T * H) return;
  const int64_t t = i / H, c = i % H;
  out[i] = LoadAs(table, static_cast<int64_t>(ids[t]) * H + c, dt);
}

// One block per row; f32 sum of squares reduced through shared memory.
__global__ void RmsNormKernel(const float* x, int64_t D, const void* w, DType wt, float eps,
                              float* y) {
  const float* xr = x + blockIdx.x * D;
  float* yr = y + blockIdx.x * D;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    ss = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (threadIdx.x == 0) part[0] = ss;
  }
  __syncthreads();
  const float inv = rsqrtf(part[0] / static_cast<float>(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) yr[i] = (xr[i] * inv) * LoadAs(w, i, wt);
}

// Rotates the pair (j, j + D/2) of row v at position pos (RopePair, device_util.cuh).
__device__ __forceinline__ void RotatePair(float* v, int64_t j, int64_t half, int64_t pos,
                                           const float* inv_freq, float scaling) {
  RopeApply(v[j], v[j + half], RopeAngle(pos, inv_freq[j], scaling));
}

__global__ void RopeKernel(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0,
                           const float* inv_freq, float scaling) {
  const int64_t half = D / 2;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= T * heads * half) return;
  const int64_t j = i % half, row = i / half, t = row / heads;
  RotatePair(x + row * D, j, half, pos0 + t, inv_freq, scaling);
}

// Thread (t, head slot, j): slots [0, heads) rotate a pair of q; slots [heads, heads + Hk)
// rotate the pair of k and write it and the same pair of v to the cache. Launched dependent
// (pdl.cuh): the angle (the position and the frequencies are the step's constants) is computed
// while the q/k/v projection before it finishes.
// rows (or null): T rows of different sequences, row t at rows[t].pos through rows[t].table
// (pos0, dpos and table unused).
__device__ __forceinline__ void RopeKVWriteBody(float* q, float* k, const float* v, int64_t T,
                                                int64_t heads, int64_t Hk, int64_t D, int64_t pos0,
                                                const int64_t* dpos, const float* inv_freq,
                                                float scaling, int64_t B, const int32_t* table,
                                                void* ka, void* va, DType dt,
                                                const RowTarget* rows) {
  const int64_t half = D / 2, slots = heads + Hk;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= T * slots * half) return;
  const int64_t j = i % half, slot = (i / half) % slots, t = i / (half * slots);
  const int64_t pos = rows != nullptr ? rows[t].pos : (dpos != nullptr ? *dpos : pos0) + t;
  if (rows != nullptr) table = rows[t].table;
  const RopeCs cs = RopeAngle(pos, inv_freq[j], scaling);
  WaitForPredecessor();
  AllowSuccessor();
  if (slot < heads) {
    float* qr = q + (t * heads + slot) * D;
    RopeApply(qr[j], qr[j + half], cs);
    return;
  }
  const int64_t h = slot - heads;
  float* kr = k + (t * Hk + h) * D;
  const float* vr = v + (t * Hk + h) * D;
  RopeApply(kr[j], kr[j + half], cs);
  const int64_t row = PagedRow(table, pos, B, Hk, h) * D;
  StoreAs(ka, row + j, dt, kr[j]);
  StoreAs(ka, row + j + half, dt, kr[j + half]);
  StoreAs(va, row + j, dt, vr[j]);
  StoreAs(va, row + j + half, dt, vr[j + half]);
}

__global__ void RopeKVWriteKernel(float* q, float* k, const float* v, int64_t T, int64_t heads,
                                  int64_t Hk, int64_t D, int64_t pos0, const int64_t* dpos,
                                  const float* inv_freq, float scaling, int64_t B,
                                  const int32_t* table, void* ka, void* va, DType dt) {
  RopeKVWriteBody(q, k, v, T, heads, Hk, D, pos0, dpos, inv_freq, scaling, B, table, ka, va, dt,
                  nullptr);
}

// The rows' targets as a kernel parameter: nothing to copy to the device first.
__global__ void RopeKVWriteRowsKernel(float* q, float* k, const float* v, int64_t T, int64_t heads,
                                      int64_t Hk, int64_t D, const float* inv_freq, float scaling,
                                      int64_t B, void* ka, void* va, DType dt,
                                      const __grid_constant__ RowTargets rows) {
  RopeKVWriteBody(q, k, v, T, heads, Hk, D, 0, nullptr, inv_freq, scaling, B, nullptr, ka, va, dt,
                  rows.r);
}

__global__ void SiluMulKernel(const float* g, const float* u, int64_t n, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float a = g[i];
  out[i] = a / (1.f + expf(-a)) * u[i];
}

__global__ void AddKernel(float* x, const float* y, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) x[i] += y[i];
}

__global__ void AddBiasKernel(float* y, int64_t T, int64_t N, const void* b, DType bt) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < T * N) y[i] += LoadAs(b, i % N, bt);
}

__global__ void ConvertKernel(const float* src, int64_t n, void* dst, DType dt) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) StoreAs(dst, i, dt, src[i]);
}

__global__ void KVWriteKernel(const float* k, const float* v, int64_t T, int64_t Hk, int64_t D,
                              int64_t pos0, int64_t B, const int32_t* table, void* ka, void* va,
                              DType dt) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= T * Hk * D) return;
  const int64_t d = i % D, h = (i / D) % Hk, t = i / (D * Hk);
  const int64_t pos = pos0 + t;
  const int64_t row = PagedRow(table, pos, B, Hk, h);
  StoreAs(ka, row * D + d, dt, k[i]);
  StoreAs(va, row * D + d, dt, v[i]);
}

// Pass r finds the largest (value, -id) strictly after pass r-1's in that order, so the passes
// emit the k largest in descending order without marking anything. One block of kTopThreads.
constexpr int kTopThreads = 1024;
// One block per row of logits (row blockIdx.x: l, vals, ids offset by it).
__global__ void TopKKernel(const float* l, int64_t V, int64_t k, float* vals, int32_t* ids) {
  l += blockIdx.x * V;
  vals += blockIdx.x * k;
  ids += blockIdx.x * k;
  __shared__ float sv[kTopThreads];
  __shared__ int64_t si[kTopThreads];
  __shared__ float prev_v;
  __shared__ int64_t prev_i;
  if (threadIdx.x == 0) prev_v = INFINITY, prev_i = -1;
  __syncthreads();
  for (int64_t r = 0; r < k; ++r) {
    const float pv = prev_v;
    const int64_t pi = prev_i;
    float best = -INFINITY;
    int64_t bi = V;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float v = l[i];
      const bool after = v < pv || (v == pv && i > pi);
      if (after && (v > best || (v == best && i < bi))) best = v, bi = i;
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        const float ov = sv[threadIdx.x + s];
        const int64_t oi = si[threadIdx.x + s];
        if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x]))
          sv[threadIdx.x] = ov, si[threadIdx.x] = oi;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      // bi == V only when every remaining value is -inf below the previous: take the next id.
      const int64_t id = si[0] < V ? si[0] : (pi + 1 < V ? pi + 1 : 0);
      vals[r] = si[0] < V ? sv[0] : l[id];
      ids[r] = static_cast<int32_t>(id);
      prev_v = vals[r];
      prev_i = id;
    }
    __syncthreads();
  }
}

}  // namespace

void Embed(const void* table, DType dtype, const int32_t* ids, int64_t T, int64_t H, float* out,
           cudaStream_t stream) {
  if (T * H == 0) return;
  EmbedKernel<<<Blocks(T * H), kThreads, 0, stream>>>(table, dtype, ids, T, H, out);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void RmsNorm(const float* x, int64_t rows, int64_t D, const void* w, DType wtype, float eps,
             float* y, cudaStream_t stream) {
  if (rows == 0) return;
  RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, D, w, wtype, eps, y);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0, const float* inv_freq,
          float scaling, cudaStream_t stream) {
  const int64_t n = T * heads * (D / 2);
  if (n == 0) return;
  RopeKernel<<<Blocks(n), kThreads, 0, stream>>>(x, T, heads, D, pos0, inv_freq, scaling);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void SiluMul(const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return;
  SiluMulKernel<<<Blocks(n), kThreads, 0, stream>>>(gate, up, n, out);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void Add(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  AddKernel<<<Blocks(n), kThreads, 0, stream>>>(x, y, n);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void AddBias(float* y, int64_t T, int64_t N, const void* bias, DType btype, cudaStream_t stream) {
  if (T * N == 0) return;
  AddBiasKernel<<<Blocks(T * N), kThreads, 0, stream>>>(y, T, N, bias, btype);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void ConvertF32(const float* src, int64_t n, void* dst, DType dst_type, cudaStream_t stream) {
  if (n == 0) return;
  ConvertKernel<<<Blocks(n), kThreads, 0, stream>>>(src, n, dst, dst_type);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void KVWrite(const float* k, const float* v, int64_t T, int64_t kv_heads, int64_t D, int64_t pos0,
             int64_t block_size, const int32_t* table, void* k_arena, void* v_arena, DType dtype,
             cudaStream_t stream) {
  const int64_t n = T * kv_heads * D;
  if (n == 0) return;
  KVWriteKernel<<<Blocks(n), kThreads, 0, stream>>>(k, v, T, kv_heads, D, pos0, block_size, table,
                                                    k_arena, v_arena, dtype);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void RopeKVWrite(float* q, float* k, const float* v, int64_t T, int64_t heads, int64_t kv_heads,
                 int64_t D, int64_t pos0, const int64_t* dpos, const float* inv_freq, float scaling,
                 int64_t block_size, const int32_t* table, void* k_arena, void* v_arena,
                 DType dtype, cudaStream_t stream) {
  const int64_t n = T * (heads + kv_heads) * (D / 2);
  if (n == 0) return;
  LaunchDependent(RopeKVWriteKernel, dim3(Blocks(n)), dim3(kThreads), 0, stream, q, k, v, T, heads,
                  kv_heads, D, pos0, dpos, inv_freq, scaling, block_size, table, k_arena, v_arena,
                  dtype);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void RopeKVWriteRows(float* q, float* k, const float* v, int64_t n, int64_t heads, int64_t kv_heads,
                     int64_t D, const RowTargets& rows, const float* inv_freq, float scaling,
                     int64_t block_size, void* k_arena, void* v_arena, DType dtype,
                     cudaStream_t stream) {
  if (n < 1 || n > kMaxRows) Fail("RopeKVWriteRows: ", n, " rows (1 to ", kMaxRows, ")");
  const int64_t total = n * (heads + kv_heads) * (D / 2);
  LaunchDependent(RopeKVWriteRowsKernel, dim3(Blocks(total)), dim3(kThreads), 0, stream, q, k, v, n,
                  heads, kv_heads, D, inv_freq, scaling, block_size, k_arena, v_arena, dtype, rows);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void TopK(const float* logits, int64_t V, int64_t k, float* vals, int32_t* ids,
          cudaStream_t stream) {
  TopKRows(logits, 1, V, k, vals, ids, stream);
}

void TopKRows(const float* logits, int64_t n, int64_t V, int64_t k, float* vals, int32_t* ids,
              cudaStream_t stream) {
  if (k <= 0 || V <= 0 || n <= 0) return;
  TopKKernel<<<static_cast<unsigned>(n), kTopThreads, 0, stream>>>(logits, V, k, vals, ids);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

namespace {
template <typename RT>
__device__ __forceinline__ float RepF32(const RT* p, int64_t i);
template <>
__device__ __forceinline__ float RepF32<float>(const float* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float RepF32<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
// One warp per (block, KV head).
template <typename RT>
__global__ void ScoreBlocksKernel(const RT* reps, int64_t R, int64_t first, int64_t n, int64_t Hk,
                                  int64_t D, const float* qa, const float* qb, float* scores) {
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (item >= n * Hk) return;
  const int64_t i = item / Hk, h = item % Hk;
  const RT* r0 = reps + ((first + i) * Hk + h) * R * D;
  float s = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    s += qa[h * D + d] * RepF32(r0, d);
    if (R == 2) s += qb[h * D + d] * RepF32(r0, D + d);
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) scores[h * n + i] = s;
}
// bf16 representatives of L = R * D / 8 <= 32 16-byte pieces (32 % L == 0): a warp scores
// per = 32 / L items (block, KV head) at a time, lane `sub` of an item loading piece sub (8
// channels) in one 16-byte load, then a reduction across the item's L lanes. Slot g of the
// grid's S * Hk item slots keeps KV head g % Hk for the whole kernel and scores blocks
// g / Hk + j * S: its 8 query channels stay in registers and nothing is divided in the loop;
// kScoreUnroll blocks in flight, the first of them loading while the query's channels do (at 1M
// tokens the resident grid's warps score about 8 blocks each: one round trip to memory, not two
// after the query's; ncu in the step before: 11.8 us for 16.7 MB, 1.4 TB/s). At 64 registers
// (4 blocks a multiprocessor) it spills 12 bytes (8 before the L2 policy). (A slot per item with
// its head and block divided out of the item's index, in 64 bits, and the query reloaded per item,
// was instruction-bound: 15 us for 16.7 MB at 1M tokens, in L2.)
constexpr int kScoreUnroll = 8;
// With q (not null): the query [Hk * G, D] itself, each slot summing its 8 channels of the
// group's queries as GroupQueriesKernel sums them (the same additions in the same order: the
// same floats), instead of a kernel of its own before this one; qa, qb unused.
__global__ void __launch_bounds__(256, 4)
    ScoreBlocksVecKernel(const __nv_bfloat16* reps, int R, int64_t first, int64_t n, int Hk, int D,
                         const float* qa, const float* qb, const float* q, int G, bool quest,
                         bool evict_first, float* scores) {
  const int L = R * D / 8, per = 32 / L, lane = static_cast<int>(threadIdx.x & 31);
  const int sub = lane % L, slot = lane / L;
  const unsigned w = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const unsigned slots = gridDim.x * (blockDim.x / 32) * per, S = slots / Hk;  // (host: S >= 1)
  const unsigned g = w * per + slot;
  const int h = static_cast<int>(g % Hk);
  const bool live = g < S * Hk;
  // The warp's first block (its lowest slot's), the same in every lane: the loop and the
  // shuffles below see the whole warp. Slot g's blocks: g / Hk + j * S.
  const int64_t bw = (w * per) / Hk, off = g / Hk - bw;
  const int e0 = sub * 8, row = e0 / D, d0 = e0 % D;  // (a piece never spans the two rows)
  const uint4* base = reinterpret_cast<const uint4*>(reps + first * Hk * R * D) + h * L + sub;
  const int64_t step = static_cast<int64_t>(Hk) * L;  // uint4s from one block to the next
  uint4 v[kScoreUnroll];
  // (32-bit block numbers: n * Hk < 2^31, checked by the host)
  const int n32 = static_cast<int>(n), S32 = static_cast<int>(S), off32 = static_cast<int>(off);
  const auto load = [&](int b0) {
    const int b = b0 + off32;
    const uint4* p = base + b * step;
    // (Read once a step, past L1, evict-first from L2 unless turned off: l2_policy.cuh. The
    // policy made here, not held across the loop: 64 registers.)
    const uint64_t pol = StreamPolicy(evict_first);
#pragma unroll
    for (int u = 0; u < kScoreUnroll; ++u)
      if (live && b + u * S32 < n32)
        v[u] = LoadOnce<false>(p + static_cast<int64_t>(u) * S32 * step, pol);
  };
  const int bw32 = static_cast<int>(bw);
  load(bw32);  // (the first blocks in flight while the query's channels load)
  // Launched dependent (pdl.cuh): the representatives are the step's constants (a Context block's
  // are uploaded by a copy before the kernel, which orders it as usual), the query is the kernel
  // before's (RoPE's, or the grouped queries').
  WaitForPredecessor();
  AllowSuccessor();
  float qv[8];
  if (q == nullptr) {
    const float4* qp = reinterpret_cast<const float4*>((row == 0 ? qa : qb) + h * D + d0);
    const float4 qlo = qp[0], qhi = qp[1];
    qv[0] = qlo.x, qv[1] = qlo.y, qv[2] = qlo.z, qv[3] = qlo.w;
    qv[4] = qhi.x, qv[5] = qhi.y, qv[6] = qhi.z, qv[7] = qhi.w;
  } else {
#pragma unroll
    for (int c = 0; c < 8; ++c) qv[c] = 0.f;
    for (int j = 0; j < G; ++j) {  // (row 1 only for Quest: the negative parts)
      const float4* qp = reinterpret_cast<const float4*>(q + (h * G + j) * D + d0);
      const float4 lo = qp[0], hi = qp[1];
      const float x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int c = 0; c < 8; ++c)
        qv[c] = __fadd_rn(qv[c], !quest ? x[c] : row == 0 ? fmaxf(x[c], 0.f) : fminf(x[c], 0.f));
    }
  }
  for (int b0 = bw32; b0 < n32; b0 += S32 * kScoreUnroll) {
    if (b0 != bw32) load(b0);
#pragma unroll
    for (int u = 0; u < kScoreUnroll; ++u) {
      const int b = b0 + off32 + u * S32;
      const bool on = live && b < n32;
      const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(&v[u]);
      float s = 0.f;
      if (on)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float2 f = __bfloat1622float2(x[c]);
          s += qv[2 * c] * f.x;
          s += qv[2 * c + 1] * f.y;
        }
      for (int o = L / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (on && sub == 0) scores[static_cast<int64_t>(h) * n + b] = s;
    }
  }
}

// The vector kernel's thread blocks that are resident at once on the whole GPU: its grid (more
// would run in a second, partial wave).
int64_t ScoreBlocksVecGrid() {
  static const int per_sm = [] {
    int n = 0;
    NEEDLE_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, ScoreBlocksVecKernel, 256, 0));
    return std::max(n, 1);
  }();
  return static_cast<int64_t>(Multiprocessors()) * per_sm;
}
}  // namespace

namespace {
// The vector kernel where it applies (bf16 pieces that tile a warp, 16-byte aligned queries);
// false: nothing launched.
bool ScoreBlocksVec(const void* reps, DType storage, int64_t R, int64_t first, int64_t n,
                    int64_t kv_heads, int64_t D, const float* qa, const float* qb, const float* q,
                    int64_t G, bool quest, float* scores, cudaStream_t stream) {
  const int64_t L = R * D / 8;
  const auto aligned = [](const float* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!(storage == DType::kBF16 && (R * D) % 8 == 0 && D % 8 == 0 && L <= 32 && 32 % L == 0 &&
        (q != nullptr ? aligned(q) : aligned(qa) && aligned(qb)) &&
        n * kv_heads < (int64_t{1} << 31)))
    return false;
  const int64_t per = 32 / L, warps_needed = (n * kv_heads + per - 1) / per;
  const int64_t grid = std::min((warps_needed + 7) / 8, ScoreBlocksVecGrid());
  if (grid * 8 * per < kv_heads) return false;  // (every slot stride a whole number of blocks)
  LaunchMaybeDependent(PlanDependentLaunch(), ScoreBlocksVecKernel,
                       dim3(static_cast<unsigned>(grid)), dim3(256), 0, stream,
                       static_cast<const __nv_bfloat16*>(reps), static_cast<int>(R), first, n,
                       static_cast<int>(kv_heads), static_cast<int>(D), qa, qb, q,
                       static_cast<int>(G), quest, StreamEvictFirst(), scores);
  NEEDLE_CUDA_CHECK_LAUNCH();
  return true;
}
}  // namespace

void ScoreBlocksFromQuery(const void* reps, DType storage, int64_t R, int64_t first, int64_t n,
                          int64_t kv_heads, int64_t G, int64_t D, const float* q, bool quest,
                          float* qa, float* qb, float* scores, cudaStream_t stream) {
  // NEEDLE_SCORE_GROUPED=0: the group queries by a kernel of their own, always (comparisons).
  static const bool fused = [] {
    const char* e = std::getenv("NEEDLE_SCORE_GROUPED");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  if (n > 0 && fused &&
      ScoreBlocksVec(reps, storage, R, first, n, kv_heads, D, nullptr, nullptr, q, G, quest, scores,
                     stream))
    return;
  GroupQueries(q, kv_heads * G, kv_heads, D, quest, qa, qb, stream);
  ScoreBlocks(reps, storage, R, first, n, kv_heads, D, qa, qb, scores, stream);
}

void ScoreBlocks(const void* reps, DType storage, int64_t R, int64_t first, int64_t n,
                 int64_t kv_heads, int64_t D, const float* qa, const float* qb, float* scores,
                 cudaStream_t stream) {
  if (n <= 0) return;
  if (ScoreBlocksVec(reps, storage, R, first, n, kv_heads, D, qa, qb, nullptr, 1, false, scores,
                     stream))
    return;
  const int64_t threads = n * kv_heads * 32;
  const unsigned grid = static_cast<unsigned>((threads + 255) / 256);
  if (storage == DType::kF32)
    ScoreBlocksKernel<<<grid, 256, 0, stream>>>(static_cast<const float*>(reps), R, first, n,
                                                kv_heads, D, qa, qb, scores);
  else
    ScoreBlocksKernel<<<grid, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(reps), R, first,
                                                n, kv_heads, D, qa, qb, scores);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

namespace {
__global__ void MergeAttentionKernel(const float* oa, const float* la, const float* ob,
                                     const float* lb, int64_t D, float* out, float* lse) {
  const int64_t r = blockIdx.x;
  const float a = la[r], b = lb[r];
  const float M = fmaxf(a, b);
  // Both empty: zeros (as an empty partial finalises), lse -inf.
  const float wa = a == -INFINITY ? 0.f : expf(a - M), wb = b == -INFINITY ? 0.f : expf(b - M);
  const float sum = wa + wb, inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    out[r * D + d] = (wa * oa[r * D + d] + wb * ob[r * D + d]) * inv;
  if (lse != nullptr && threadIdx.x == 0) lse[r] = sum > 0.f ? M + logf(sum) : -INFINITY;
}
}  // namespace

void MergeAttention(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b,
                    int64_t rows, int64_t D, float* out, float* lse, cudaStream_t stream) {
  if (rows <= 0) return;
  MergeAttentionKernel<<<static_cast<unsigned>(rows), 128, 0, stream>>>(out_a, lse_a, out_b, lse_b,
                                                                        D, out, lse);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

}  // namespace needle::cuda
