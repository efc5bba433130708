// The end of a flash-decoding block, shared by the decode kernels (attention_decode.cu,
// attention_decode_tma.cu): the block combines the partial results of its groups of threads,
// writes its split's result, and the last block of a KV head to arrive merges the splits of that
// head: out = sum_s w_s o_s with w_s = l_s exp(m_s - M) / L, the algebra of
// engine/attention/partial.h.
#pragma once

#include <cmath>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_params.h"

namespace needle::cuda {

// Splits per KV head at most: the last block folds the splits in rounds of loads, so more
// splits lengthen the tail of every call.
constexpr int kMaxDecodeSplits = 256;

// Where the merged result goes and the arrival counters; used when p.splits > 1.
struct MergeArgs {
  float* out;             // [heads, D]
  float* lse;             // [heads] or nullptr
  unsigned int* counter;  // [kv_heads], zero between calls
};

// UsePartials (attention_decode.h) for a decode call; returns where the merged result goes (p's
// out and lse as given) and the arrival counters, zeroed when first allocated.
inline MergeArgs UseSplits(AttnParams& p, int64_t splits, AttnWorkspace& ws, cudaStream_t stream) {
  MergeArgs mg{p.out, p.m, nullptr};
  UsePartials(p, splits, ws);
  if (splits > 1)
    mg.counter = ws.counters.GetZeroed<unsigned int>(static_cast<size_t>(p.kv_heads), stream);
  return mg;
}

// Combines the NG partial results of the block for the G query heads of KV head h and writes the
// block's result: out/lse with one split, else its split's partial (p.out, p.m, p.l).
//   acc [NG][kG][D]: unnormalised sums of p v; m, l [NG][kG]: running maxima (natural log units,
//   -inf when the group saw no key) and sums. Shared memory, written before a __syncthreads().
template <int kThreads, int kG, int D>
__device__ __forceinline__ void WriteBlockResult(const AttnParams& p, int64_t h, int split, int NG,
                                                 const float* acc, const float* m, const float* l) {
  for (int i = threadIdx.x; i < p.G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float M = -INFINITY;
    for (int j = 0; j < NG; ++j) M = fmaxf(M, m[j * kG + g]);
    float L = 0.f, O = 0.f;
    if (M != -INFINITY) {
      for (int j = 0; j < NG; ++j) {
        const float w = __expf(m[j * kG + g] - M);
        L += l[j * kG + g] * w;
        O += acc[(j * kG + g) * D + d] * w;
      }
    }
    const int64_t row = h * p.G + g;
    const float o = L > 0.f ? O / L : 0.f;
    p.out[(static_cast<int64_t>(split) * p.heads + row) * D + d] = o;
    if (d == 0) {
      if (p.splits > 1) {
        p.m[split * p.heads + row] = M;
        p.l[split * p.heads + row] = L;
      } else if (p.m != nullptr) {
        p.m[row] = L > 0.f ? M + logf(L) : -INFINITY;
      }
    }
  }
}

// Counts the block in on `counter` (called by every thread, after the block's partial writes);
// true in the last of `n` blocks to arrive, whose threads may then read the others' partials.
// One acq_rel atomic by thread 0 after the barrier is both the release of the block's writes (the
// barrier orders every thread's writes before it) and the acquire of the earlier blocks'; it
// replaces __threadfence() before and after a relaxed atomic, two sequentially consistent fences
// (bench_cuda's decode floors measure both). The .global form takes a global-space address.
__device__ __forceinline__ bool ArriveLast(unsigned int* counter, unsigned int n) {
  __shared__ unsigned int arrived;
  __syncthreads();
  if (threadIdx.x == 0)
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                 : "=r"(arrived)
                 : "l"(__cvta_generic_to_global(counter))
                 : "memory");
  __syncthreads();
  return arrived == n - 1;
}

// The last block of KV head h (after ArriveLast) merges the p.splits partials of h into
// mg.out/mg.lse and returns the counter to zero. The merge is latency-bound (it runs after every
// other block of h is done): each thread owns one float4 column of one query head and loads m, l
// and that column of kChunk splits at once, one round trip to L2 per kChunk splits, then folds
// them in registers.
template <int kWarps, int kG, int D>
__device__ __forceinline__ void MergeSplits(const AttnParams& p, const MergeArgs& mg, int64_t h) {
  constexpr int kThreads = kWarps * 32, kChunk = 16, C4 = D / 4;
  const int S = p.splits;
  for (int idx = threadIdx.x; idx < p.G * C4; idx += kThreads) {
    const int g = idx / C4, c = idx % C4;
    const int64_t row = h * p.G + g;
    float M = -INFINITY, L = 0.f;
    float4 O = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < S; s0 += kChunk) {
      float ms[kChunk], ls[kChunk];
      float4 os[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const int s = s0 + j;
        if (s < S) {
          const int64_t r = s * p.heads + row;
          ms[j] = __ldcg(p.m + r);
          ls[j] = __ldcg(p.l + r);
          os[j] = __ldcg(reinterpret_cast<const float4*>(p.out + r * D) + c);
        } else {
          ms[j] = -INFINITY;
          ls[j] = 0.f;
          os[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
      // Split s weighs l_s exp(m_s - M); its partial o_s is already divided by l_s. The chunk's
      // maximum first, so that its weights are independent of one another.
      float mc = -INFINITY;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) mc = ls[j] > 0.f ? fmaxf(mc, ms[j]) : mc;
      if (mc == -INFINITY) continue;                      // no split of the chunk saw a key
      const float mn = fmaxf(M, mc), a = __expf(M - mn);  // M = -inf: a = 0
      L *= a;
      O.x *= a;
      O.y *= a;
      O.z *= a;
      O.w *= a;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const float w = ls[j] > 0.f ? ls[j] * __expf(ms[j] - mn) : 0.f;
        L += w;
        O.x += w * os[j].x;
        O.y += w * os[j].y;
        O.z += w * os[j].z;
        O.w += w * os[j].w;
      }
      M = mn;
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    reinterpret_cast<float4*>(mg.out + row * D)[c] =
        make_float4(O.x * inv, O.y * inv, O.z * inv, O.w * inv);
    if (c == 0 && mg.lse != nullptr) mg.lse[row] = L > 0.f ? M + logf(L) : -INFINITY;
  }
  if (threadIdx.x == 0) mg.counter[h] = 0;  // every block of h has arrived: ready for the next call
}

// After WriteBlockResult, with p.splits > 1, called by every thread of the block: the last block
// of KV head h to arrive merges the splits of h.
template <int kWarps, int kG, int D>
__device__ __forceinline__ void MergeIfLast(const AttnParams& p, const MergeArgs& mg, int64_t h) {
  if (ArriveLast(mg.counter + h, static_cast<unsigned>(p.splits)))
    MergeSplits<kWarps, kG, D>(p, mg, h);
}

}  // namespace needle::cuda
