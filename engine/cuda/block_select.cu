#include "engine/cuda/block_select.h"

#include "engine/cuda/cuda_check.h"
#include "engine/cuda/pdl.cuh"
#include "engine/cuda/plan_rows.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace needle::cuda {
namespace {

constexpr int kSelectThreads = 1024;
// The fused selection's dynamic shared memory at most, beside the top-k's own (about 13 KB
// static) within the 48 KB a block has without opting in.
constexpr size_t kFusedSelectShared = 32 * 1024;

// Unsigned keys in ranking order: the score's bits made monotone (negative floats reversed),
// then the complement of the block id (a lower id ranks higher). Distinct for distinct ids.
__device__ __forceinline__ unsigned long long RankKey(float s, int32_t id) {
  unsigned b = __float_as_uint(s);
  b = (b & 0x80000000u) != 0 ? ~b : (b | 0x80000000u);
  return (static_cast<unsigned long long>(b) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<unsigned>(id));
}

// Score i of row `row` of scores [rows_in][n], or (sum) of every row summed in row order.
__device__ __forceinline__ float RowScore(const float* scores, int64_t n, int64_t rows_in, bool sum,
                                          int64_t row, int64_t i) {
  if (!sum) return scores[row * n + i];
  float x = 0.f;
  for (int64_t h = 0; h < rows_in; ++h) x = __fadd_rn(x, scores[h * n + i]);
  return x;
}

// The score a RankKey was made of (the inverse of its high word).
__device__ __forceinline__ float ScoreOfKey(unsigned long long key) {
  const unsigned b = static_cast<unsigned>(key >> 32);
  return __uint_as_float((b & 0x80000000u) != 0 ? (b & 0x7fffffffu) : ~b);
}

// Where the fused selection takes the shortlist from (TopBlocksKernel): each entry also into
// shared memory (sc, id [k]: SelectRow's first arrays) and its block's table entry prefetched
// into L1 for the view's slots (SelectRow would otherwise read both from global memory, one
// round trip each, after the top-k's last barrier). Empty (nulls): nothing.
struct ShortlistCopy {
  float* sc = nullptr;
  int32_t* id = nullptr;
  const int32_t* table = nullptr;
  __device__ void Put(int at, float s, int32_t b) const {
    if (sc == nullptr) return;
    sc[at] = s, id[at] = b;
    asm volatile("prefetch.global.L1 [%0];" ::"l"(table + b));
  }
};

// Keys a thread keeps in registers (candidates [0, kKeysPerThread * blockDim.x) of its row); the
// rest, if any, are recomputed from the scores at each pass.
constexpr int kKeysPerThread = 8;

// A first search that usually settles the row, where every candidate's key is in the registers
// (n <= kKeysPerThread * blockDim.x) and the scores are finite: buckets linear in the score
// between the row's lowest and highest (a monotone map: a higher score never falls in a lower
// bucket); the buckets from the top down to the one that holds the k-th best hold every key of
// the top k; when those are at most kMaxCandidates, each finds its rank among them by comparing
// with all the others (the keys are distinct) and the first k are written. The radix passes
// below need three or four rounds of histogram and scan for scores of one sign and similar
// magnitude (the float's high bytes barely differ), this one round. false (nothing written):
// too many candidates, infinite or NaN scores, all equal, or a row longer than the registers.
constexpr int kValueBuckets = 1024, kMaxCandidates = 1024;
__device__ __forceinline__ bool TopByValueBuckets(const unsigned long long* cached, int64_t n,
                                                  int k, int64_t want, int64_t row, float* vals,
                                                  int32_t* ids, const ShortlistCopy& cp) {
  if (n > static_cast<int64_t>(kKeysPerThread) * blockDim.x || blockDim.x % 32 != 0 ||
      blockDim.x > kMaxCandidates)
    return false;
  __shared__ unsigned b_hist[kValueBuckets];
  __shared__ unsigned long long b_cand[kMaxCandidates];
  __shared__ unsigned s_lo, s_hi, s_count_c;
  __shared__ int s_bound, s_cands;
  const int lane = static_cast<int>(threadIdx.x & 31);
  if (threadIdx.x == 0) s_lo = 0xffffffffu, s_hi = 0, s_count_c = 0, s_bound = -1, s_cands = 0;
  for (int i = threadIdx.x; i < kValueBuckets; i += blockDim.x) b_hist[i] = 0;
  unsigned lo = 0xffffffffu, hi = 0;  // (the keys' high words order as the scores)
#pragma unroll
  for (int j = 0; j < kKeysPerThread; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (i < n) {
      const unsigned h = static_cast<unsigned>(cached[j] >> 32);
      lo = min(lo, h), hi = max(hi, h);
    }
  }
  lo = __reduce_min_sync(0xffffffffu, lo);  // (compute capability 8.0 and later)
  hi = __reduce_max_sync(0xffffffffu, hi);
  __syncthreads();  // (the initial values above)
  if (lane == 0) atomicMin(&s_lo, lo), atomicMax(&s_hi, hi);
  __syncthreads();
  const float smin = ScoreOfKey(static_cast<unsigned long long>(s_lo) << 32),
              smax = ScoreOfKey(static_cast<unsigned long long>(s_hi) << 32);
  const float scale = static_cast<float>(kValueBuckets) / (smax - smin);
  if (!isfinite(smin) || !isfinite(smax) || !(smax > smin) || !isfinite(scale)) return false;
  const auto bucket = [&](unsigned long long key) {
    const float x = (ScoreOfKey(key) - smin) * scale;  // >= 0, about kValueBuckets at most
    return min(kValueBuckets - 1, __float2int_rz(x));
  };
#pragma unroll
  for (int j = 0; j < kKeysPerThread; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (i < n) atomicAdd(&b_hist[bucket(cached[j])], 1u);
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // lane l sums buckets [32 l, 32 l + 32); from the top down to the k-th
    constexpr int per = kValueBuckets / 32;
    static_assert(per == 32, "the skewed reads below need 32 buckets a lane");
    unsigned tot = 0;
    // (Skewed: at step j lane l reads its bucket (j + l) % 32, so the 32 lanes hit 32 banks; in
    // order, all of them read one bank at each step, 32 ways serialized.)
    for (int j = 0; j < per; ++j) tot += b_hist[lane * per + ((j + lane) & (per - 1))];
    unsigned above = tot;  // lanes >= this one
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned t = __shfl_down_sync(0xffffffffu, above, o);
      if (lane + o < 32) above += t;
    }
    const unsigned higher = above - tot;  // in lanes above this one
    // The one lane L whose buckets hold the k-th best; then lane j takes bucket 32 L + j: the
    // keys in buckets from it up (suffix sums), and the bound is the highest bucket from which up
    // there are k. (Lane L walking its 32 buckets alone: this warp's part took 1.08 us of the
    // kernel in a 1M step on the H100, 0.77 so.)
    const unsigned at = __ballot_sync(
        0xffffffffu, higher < static_cast<unsigned>(k) && above >= static_cast<unsigned>(k));
    if (at != 0) {  // (always: lane 0's `above` counts all n >= k keys; else s_bound stays -1)
      const int L = __ffs(at) - 1;
      const unsigned base = __shfl_sync(0xffffffffu, higher, L);
      unsigned suf = b_hist[L * per + lane];
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned t = __shfl_down_sync(0xffffffffu, suf, o);
        if (lane + o < 32) suf += t;
      }
      const unsigned cum = base + suf;  // (lane 0's is lane L's `above`: at least k)
      const unsigned ok = __ballot_sync(0xffffffffu, cum >= static_cast<unsigned>(k));
      if (lane == 31 - __clz(ok)) s_bound = L * per + lane, s_cands = static_cast<int>(cum);
    }
  }
  __syncthreads();
  const int bound = s_bound, cands = s_cands;
  if (bound < 0 || cands > kMaxCandidates) return false;
#pragma unroll
  for (int j = 0; j < kKeysPerThread; ++j) {
    // (An atomic per candidate. Warp-aggregated, a ballot for each of every warp's 8 keys, this
    // took 1.5 us instead of 0.85: the candidates are few, the ballots are not.)
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (i < n && bucket(cached[j]) >= bound) b_cand[atomicAdd(&s_count_c, 1u)] = cached[j];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < cands; c += blockDim.x) {
    const unsigned long long key = b_cand[c];
    int rank = 0;
    for (int o = 0; o < cands; ++o) rank += b_cand[o] > key ? 1 : 0;
    if (rank < k) {
      const float sc = ScoreOfKey(key);
      const auto id = static_cast<int32_t>(0xffffffffu - static_cast<unsigned>(key));
      vals[row * want + rank] = sc;
      ids[row * want + rank] = id;
      cp.Put(rank, sc, id);
    }
  }
  return true;
}

// TopBlocksKernel's work, one block per row (a KV head; sum: the Hk rows summed): the k = min(want,
// n) best candidates of scores [Hk][n] (block ids first + i), ranked as sparse_attn/ ranks them:
// higher score first, then lower block id, written to vals, ids [.][want] at the row, in no
// particular order.
//
// First the value buckets (TopByValueBuckets); where they do not apply, passes of an 8-bit radix
// select over the keys, most significant byte first, find the k-th largest key exactly (the keys
// are distinct); then every key at or above it is written out. A pass ends the search early when
// the bin it chose holds exactly the keys still wanted: all of them are in, and nothing below is
// (distinct scores: usually after the score's four bytes instead of eight passes).
__device__ __forceinline__ void TopRow(const float* scores, int64_t Hk, int64_t n, bool sum,
                                       int32_t first, int64_t want, float* vals, int32_t* ids,
                                       const ShortlistCopy& cp) {
  const int64_t row = blockIdx.x;
  const int k = static_cast<int>(want < n ? want : n);
  __shared__ unsigned hist[256];
  __shared__ unsigned long long s_prefix;
  __shared__ int s_left, s_count, s_done;
  if (threadIdx.x == 0) s_prefix = 0, s_left = k, s_count = 0, s_done = 0;
  const auto key_of = [&](int64_t i) {
    return RankKey(RowScore(scores, n, Hk, sum, row, i), first + static_cast<int32_t>(i));
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
  if (TopByValueBuckets(cached, n, k, want, row, vals, ids, cp)) return;
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
      const float sc = RowScore(scores, n, Hk, sum, row, i);
      vals[row * want + at] = sc;
      ids[row * want + at] = first + static_cast<int32_t>(i);
      cp.Put(at, sc, first + static_cast<int32_t>(i));
    }
  });
}

// TopRow of row blockIdx.x. With sa.sel (not null): then the device plan's selection of the row
// from that shortlist (plan_rows.cuh), in the dynamic shared memory, instead of a kernel of its
// own after this one; with ra.ret (not null), first the retention of the layer's previous step
// (its own inputs; the selection reads what it writes), in the same shared memory.
__global__ void __launch_bounds__(kSelectThreads)
    TopBlocksKernel(const float* scores, int64_t Hk, int64_t n, bool sum, int32_t first,
                    int64_t want, float* vals, int32_t* ids, SelectArgs sa, RetainArgs ra) {
  extern __shared__ int32_t select_smem[];
  // (The retention the selection starts from, into L1 while the top-k runs; before the wait
  // where it is complete: written by an earlier step, or by the retention's own stream, which
  // the stream waited for before the scoring. A retention pending here is written below.)
  const auto prefetch_retention = [&] {
    const int h0 = sa.by_layer ? 0 : static_cast<int>(blockIdx.x);
    if (static_cast<int>(threadIdx.x) < sa.R)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(sa.ret + h0 * sa.R + threadIdx.x));
    if (threadIdx.x == 0 && sa.rcount != nullptr)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(sa.rcount + h0));
  };
  if (sa.sel != nullptr && ra.ret == nullptr) prefetch_retention();
  // Launched dependent (pdl.cuh): the scores are the kernel before's.
  WaitForPredecessor();
  if (ra.ret != nullptr) {
    RetainRow(ra, select_smem);
    __syncthreads();  // (its retention written; its shared memory free again)
  }
  const int k = static_cast<int>(want < n ? want : n);
  ShortlistCopy cp;
  if (sa.sel != nullptr) {
    // The attention after it (launched dependent) may start now: before its wait it reads only
    // the view's table entries the selection does not write (KVLayerView::table_step_lo/hi) and
    // the tiles they name, which nothing in this kernel writes; it loads the Initial and Local
    // tiles while the top-k runs on a few multiprocessors.
    AllowSuccessor();
    cp.sc = reinterpret_cast<float*>(select_smem), cp.id = select_smem + k;
    cp.table = sa.table + (sa.by_layer ? 0 : blockIdx.x) * sa.table_head_stride;  // (the row's)
    if (ra.ret != nullptr) prefetch_retention();
  }
  TopRow(scores, Hk, n, sum, first, want, vals, ids, cp);
  if (sa.sel == nullptr) return;
  __syncthreads();  // (the row's shortlist, written by every thread, visible to all)
  SelectRow(sa, vals, ids, want, k, select_smem, true);
}

__global__ void GroupQueriesKernel(const float* q, int64_t G, int64_t n, int64_t D, bool quest,
                                   float* qa, float* qb) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t h = i / D, d = i % D;
  float a = 0.f, b = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const float x = q[(h * G + g) * D + d];
    if (!quest) {
      a = __fadd_rn(a, x);
    } else {
      a = __fadd_rn(a, fmaxf(x, 0.f));
      b = __fadd_rn(b, fminf(x, 0.f));
    }
  }
  qa[i] = a;
  qb[i] = b;
}

// Block (x, c): threads of chunk c, one per (KV head, channel d).
__global__ void GroupChunkQueriesKernel(const float* q, const int32_t* chunks, int64_t heads,
                                        int64_t Hk, int64_t D, bool quest, const float* rot_table,
                                        float* out) {
  const int64_t c = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= Hk * D) return;
  const int64_t h = i / D, d = i % D, G = heads / Hk, half = D / 2;
  const int64_t t0 = chunks[c * 3], T = chunks[c * 3 + 1], r = chunks[c * 3 + 2];
  // The rotation of channel d: rotate-half pairs (j, j + half); the odd channel of an odd D stays.
  const int64_t j = d < half ? d : d - half;
  const bool rot = r >= 0 && d < 2 * half;
  const float cs = rot ? rot_table[r * D + j] : 1.f, sn = rot ? rot_table[r * D + half + j] : 0.f;
  const int64_t pair = d < half ? d + half : d - half;
  float a = 0.f, b = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = q + ((t0 + t) * heads + h * G) * D;
#pragma unroll 4
    for (int64_t g = 0; g < G; ++g) {
      float x = row[g * D + d];
      if (rot) {
        const float p = row[g * D + pair];
        x = d < half ? __fsub_rn(__fmul_rn(x, cs), __fmul_rn(p, sn))
                     : __fadd_rn(__fmul_rn(x, cs), __fmul_rn(p, sn));
      }
      if (!quest) {
        a = __fadd_rn(a, x);
      } else {
        a = __fadd_rn(a, fmaxf(x, 0.f));
        b = __fadd_rn(b, fminf(x, 0.f));
      }
    }
  }
  out[(c * 2) * Hk * D + i] = a;
  out[(c * 2 + 1) * Hk * D + i] = b;
}

}  // namespace

void GroupChunkQueries(const float* q, const int32_t* chunks, int64_t n_chunks, int64_t heads,
                       int64_t kv_heads, int64_t D, bool quest, const float* rot_table, float* out,
                       cudaStream_t stream) {
  const int64_t n = kv_heads * D;
  if (n <= 0 || n_chunks <= 0) return;
  GroupChunkQueriesKernel<<<dim3(static_cast<unsigned>((n + 127) / 128),
                                 static_cast<unsigned>(n_chunks)),
                            128, 0, stream>>>(q, chunks, heads, kv_heads, D, quest, rot_table, out);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void GroupQueries(const float* q, int64_t heads, int64_t kv_heads, int64_t D, bool quest, float* qa,
                  float* qb, cudaStream_t stream) {
  const int64_t n = kv_heads * D;
  if (n <= 0) return;
  GroupQueriesKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      q, heads / kv_heads, n, D, quest, qa, qb);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void TopBlocks(const float* scores, int64_t kv_heads, int64_t n, bool sum_heads, int32_t first,
               int64_t want, float* vals, int32_t* ids, cudaStream_t stream) {
  if (n <= 0 || want <= 0) return;
  const unsigned rows = sum_heads ? 1u : static_cast<unsigned>(kv_heads);
  LaunchMaybeDependent(PlanDependentLaunch(), TopBlocksKernel, dim3(rows), dim3(kSelectThreads), 0,
                       stream, scores, kv_heads, n, sum_heads, first, want, vals, ids, SelectArgs{},
                       RetainArgs{});
  NEEDLE_CUDA_CHECK_LAUNCH();
}

bool FusedSelectOn() {
  static const bool on = [] {
    const char* e = std::getenv("NEEDLE_TOPK_SELECT");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on;
}

bool TopBlocksSelect(const float* scores, int64_t kv_heads, int64_t n, bool sum_heads,
                     int32_t first, int64_t want, float* vals, int32_t* ids, const SelectArgs& sa,
                     const RetainArgs* retain, cudaStream_t stream) {
  const bool fused = FusedSelectOn();
  const int64_t k = std::min(want, n);
  const bool ret = retain != nullptr && retain->n > 0 && retain->R > 0;
  const size_t smem =
      std::max(SelectSharedBytes(k, sa.R), ret ? RetainSharedBytes(*retain) : size_t{0});
  if (!fused || n <= 0 || want <= 0 || sa.n_sel <= 0 || smem > kFusedSelectShared ||
      sum_heads != sa.by_layer || (retain != nullptr && retain->by_layer != sa.by_layer))
    return false;
  const unsigned rows = sum_heads ? 1u : static_cast<unsigned>(kv_heads);
  LaunchMaybeDependent(PlanDependentLaunch(), TopBlocksKernel, dim3(rows), dim3(kSelectThreads),
                       smem, stream, scores, kv_heads, n, sum_heads, first, want, vals, ids, sa,
                       ret ? *retain : RetainArgs{});
  NEEDLE_CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace needle::cuda
