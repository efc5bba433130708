// The exact top-k of one row of block scores, run by one thread block: the body of
// cuda::TopBlocks (block_select.cu) and of the fused shortlist (shortlist.cu), which runs it in
// the blocks that finish last, over scores other blocks of the same launch wrote.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace needle::cuda {

// Unsigned keys in ranking order: the score's bits made monotone (negative floats reversed),
// then the complement of the block id (a lower id ranks higher). Distinct for distinct ids.
__device__ __forceinline__ unsigned long long RankKey(float s, int32_t id) {
  unsigned b = __float_as_uint(s);
  b = (b & 0x80000000u) != 0 ? ~b : (b | 0x80000000u);
  return (static_cast<unsigned long long>(b) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<unsigned>(id));
}

// Score i of row `row` of scores [rows_in][n], or (sum) of every row summed in row order. Read
// through L2 (__ldcg): another thread block of the same launch may have written it.
__device__ __forceinline__ float RowScore(const float* scores, int64_t n, int64_t rows_in, bool sum,
                                          int64_t row, int64_t i) {
  if (!sum) return __ldcg(scores + row * n + i);
  float x = 0.f;
  for (int64_t h = 0; h < rows_in; ++h) x = __fadd_rn(x, __ldcg(scores + h * n + i));
  return x;
}

// Keys a thread keeps in registers (candidates [0, kKeysPerThread * blockDim.x) of its row); the
// rest, if any, are recomputed from the scores at each pass.
constexpr int kKeysPerThread = 8;

// For row `row` (a KV head; sum: the rows_in rows summed), the k = min(want, n) best candidates
// of scores [rows_in][n] (block ids first + i), ranked as sparse_attn/ ranks them: higher score
// first, then lower block id, written to vals, ids [.][want] at row `row`, in no particular
// order. Every thread of the block calls it.
//
// Passes of an 8-bit radix select over the keys, most significant byte first, find the k-th
// largest key exactly (the keys are distinct); then every key at or above it is written out. A
// pass ends the search early when the bin it chose holds exactly the keys still wanted: all of
// them are in, and nothing below is (distinct scores: usually after the score's four bytes
// instead of eight passes).
__device__ __forceinline__ void TopRow(const float* scores, int64_t rows_in, int64_t n, bool sum,
                                       int32_t first, int64_t want, int64_t row, float* vals,
                                       int32_t* ids) {
  const int k = static_cast<int>(want < n ? want : n);
  __shared__ unsigned hist[256];
  __shared__ unsigned long long s_prefix;
  __shared__ int s_left, s_count, s_done;
  if (threadIdx.x == 0) s_prefix = 0, s_left = k, s_count = 0, s_done = 0;
  const auto key_of = [&](int64_t i) {
    return RankKey(RowScore(scores, n, rows_in, sum, row, i), first + static_cast<int32_t>(i));
  };
  unsigned long long cached[kKeysPerThread];
#pragma unroll
  for (int j = 0; j < kKeysPerThread; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    cached[j] = i < n ? key_of(i) : 0;
  }
  // f(key, i) for every candidate i of this thread.
  const auto each = [&](auto&& f) {
#pragma unroll
    for (int j = 0; j < kKeysPerThread; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      if (i < n) f(cached[j], i);
    }
    for (int64_t i = threadIdx.x + static_cast<int64_t>(kKeysPerThread) * blockDim.x; i < n;
         i += blockDim.x)
      f(key_of(i), i);
  };
  unsigned long long mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const unsigned long long prefix = s_prefix;
    // The cached keys counted once per warp and bin (the high bytes of similar scores fall in a
    // few bins: one atomic per key queued up to thousands deep on them, tens of microseconds a
    // pass at 8K candidates); the rest one by one.
    const int lane = static_cast<int>(threadIdx.x & 31);
#pragma unroll
    for (int j = 0; j < kKeysPerThread; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      const bool in = i < n && (cached[j] & mask) == prefix;
      const unsigned act = __ballot_sync(0xffffffffu, in);
      if (in) {
        const unsigned bin = static_cast<unsigned>(cached[j] >> shift) & 255u;
        const unsigned peers = __match_any_sync(act, bin);
        if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
      }
    }
    for (int64_t i = threadIdx.x + static_cast<int64_t>(kKeysPerThread) * blockDim.x; i < n;
         i += blockDim.x) {
      const unsigned long long key = key_of(i);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // warp 0 finds the digit: lane l holds bins 255 - 8l down to 248 - 8l
      const int lane = threadIdx.x;
      const unsigned left = static_cast<unsigned>(s_left);  // (the shuffles order the write below)
      unsigned c[8], tot = 0;
      for (int j = 0; j < 8; ++j) c[j] = hist[255 - 8 * lane - j], tot += c[j];
      unsigned incl = tot;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      const unsigned excl = incl - tot;
      if (excl < left && incl >= left) {
        unsigned cum = excl;
        for (int j = 0; j < 8; ++j) {
          if (cum + c[j] >= left) {
            s_left = static_cast<int>(left - cum);
            s_prefix = prefix | (static_cast<unsigned long long>(255 - 8 * lane - j) << shift);
            // The bin's keys are exactly the ones still wanted: the prefix, its lower bytes
            // zero, is the threshold.
            if (cum + c[j] == left) s_done = 1;
            break;
          }
          cum += c[j];
        }
      }
    }
    mask |= 255ull << shift;
    __syncthreads();
    if (s_done != 0) break;
  }
  const unsigned long long kth = s_prefix;
  each([&](unsigned long long key, int64_t i) {
    if (key >= kth) {
      const int at = atomicAdd(&s_count, 1);
      vals[row * want + at] = RowScore(scores, n, rows_in, sum, row, i);
      ids[row * want + at] = first + static_cast<int32_t>(i);
    }
  });
}

}  // namespace needle::cuda
