// The CPU operators, in two implementations with identical signatures:
//   needle::ref   plain scalar loops, written for clarity: the reference every fast kernel is
//                 tested against (tests/test_kernels.cc) and selectable with --reference-kernels;
//   needle::fast  Highway SIMD (dispatched once per call to the best target of this CPU) and
//                 oneTBB across the threads of the ThreadingContext.
// Activations are always f32; weights may be f32, f16 or bf16, the KV cache also int8, and
// every product accumulates in f32.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/base/threading.h"
#include "engine/model/weights.h"
#include "kvcache/kv_cache.h"

namespace needle {

struct AttnArgs {
  int64_t T = 1;         // queries, at positions pos0 .. pos0 + T - 1
  int64_t pos0 = 0;      // position of the first query; keys [0, pos0 + t] are visible to query t
  int64_t heads = 1;     // query heads
  int64_t kv_heads = 1;  // query head h reads KV head h / (heads / kv_heads)
  int64_t head_dim = 0;
  int64_t window = 0;  // > 0: query at p sees keys (p - window, p] only (sliding window)
  float scale = 1.0f;  // softmax scale, 1/sqrt(head_dim)
  // The call's RoPE inverse frequencies [head_dim / 2] (for position remapping); may be null.
  const float* inv_freq = nullptr;
};

// A run of consecutive key positions [begin, end).
struct KeySpan {
  int64_t begin, end;
};

// The keys each (query token t, KV head h) attends, for sparse attention: item i = t * kv_heads + h
// owns spans[offsets[i] .. offsets[i + 1]), ascending and disjoint, all before or at the query's
// position. Dense attention passes no spans (every visible key).
struct AttnSpans {
  std::vector<int64_t> offsets;  // [T * kv_heads + 1]
  std::vector<KeySpan> spans;
  // Position remapping (optional): the query scores span i's keys rotated by a further rotation
  // (rot_table row rot[i], from RotationRow), as if it stood that many positions from where it
  // was rotated to; rot[i] = -1, or rot empty: the query as it is. rot_table: [rows][head_dim].
  std::vector<int32_t> rot;
  std::vector<float> rot_table;
};

// One rotation row [D] of rot_table: cos (first D/2) and sin (last D/2) of delta * inv_freq[i]
// (angle in f32, cos and sin in double, as RopeTable computes them).
void RotationRow(int64_t delta, const float* inv_freq, int64_t D, float* row);
// out [rows, D] = each row of q [rows, D] rotated by `row` (rotate-half pairs (i, i + D/2)).
void RotateRows(const float* q, int64_t rows, int64_t D, const float* row, float* out);

#define NEEDLE_CPU_OPS                                                                             \
  /* y[T, N] = x[T, K] * W[N, K]^T (+ bias[N]) */                                                  \
  void MatMul(const float* x, int64_t T, const Weight& w, const Weight* bias, float* y,            \
              ThreadingContext& tc);                                                               \
  /* y[rows, D] = x * rsqrt(mean(x^2) + eps) * w[D]   (x, y: [rows, D]; y may alias x) */          \
  void RmsNorm(const float* x, int64_t rows, int64_t D, const Weight& w, float eps, float* y,      \
               ThreadingContext& tc);                                                              \
  /* x[T, heads, D] rotated in place, rotate-half layout: pairs (i, i + D/2);                      \
     angle(t, i) = f32(pos0 + t) * inv_freq[i]; cos and sin are multiplied by scaling */           \
  void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0, const float* inv_freq,    \
            float scaling, ThreadingContext& tc);                                                  \
  /* out[n] = silu(gate[n]) * up[n] */                                                             \
  void SiluMul(const float* gate, const float* up, int64_t n, float* out, ThreadingContext& tc);   \
  /* x[n] += y[n] */                                                                               \
  void Add(float* x, const float* y, int64_t n, ThreadingContext& tc);                             \
  /* out[T, heads, D] = softmax(scale * q k^T) v over the keys of `spans` (nullptr: every          \
     visible key); q: [T, heads, D] f32, rotated. lse (optional): [T, heads], the log-sum-exp      \
     of the scaled scores attended (-inf when none) */                                             \
  void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans, \
                 float* out, float* lse, ThreadingContext& tc);

namespace ref {
NEEDLE_CPU_OPS
}  // namespace ref
namespace fast {
NEEDLE_CPU_OPS
}  // namespace fast

namespace fast {
// One decode query (a.T == 1) over whole blocks of the cache: blocks[h] for KV head h. out
// [heads, D] and lse [heads] over those keys alone (a head without blocks: zeros, -inf), and per
// block its own sums, stats [sum_h n_h][G][2] = {m, l} in the order of blocks: l = sum over the
// block's keys of exp(score - m). The hybrid engine's Context blocks; the stats give retention's
// block masses without a second pass (BlockMassFromStats).
// times, where not null: its phases added to (seconds, host clock; FoldTimes).
struct FoldTimes {
  // The items and the queries before the fold; from the fold's ParallelFor call until its first
  // item began (the threads' start) and until it returned; the merge of the items' partials.
  double setup = 0, start = 0, fold = 0, merge = 0;
  // Inside the fold: from its ParallelFor call until its last item ended (fold less last: the
  // join), the items' own times added up over the threads (busy / (threads x (last - start)):
  // how much of the threads' span went into items), and counts: items, the chunks the threads
  // took (a thread's body call), the distinct threads that took any, and the calls.
  double last = 0, busy = 0, items = 0, chunks = 0, threads = 0, calls = 0;
  FoldTimes& operator+=(const FoldTimes& o) {
    setup += o.setup, start += o.start, fold += o.fold, merge += o.merge;
    last += o.last, busy += o.busy, items += o.items, chunks += o.chunks, threads += o.threads;
    calls += o.calls;
    return *this;
  }
};
void AttendBlocks(const float* q, const KVLayerView& kv, const AttnArgs& a,
                  const std::vector<std::vector<int32_t>>& blocks, float* out, float* lse,
                  std::vector<float>* stats, ThreadingContext& tc, FoldTimes* times = nullptr);
// mass[h][i] = sum_g l * exp(m - lse[h * G + g]) of block i of head h (block_mass.h's mass, with
// lse over everything the step attended).
void BlockMassFromStats(const std::vector<float>& stats, const float* lse, int64_t G,
                        const std::vector<std::vector<int32_t>>& blocks,
                        std::vector<std::vector<float>>* mass);
// Rows [b, e) of KV head h of the cache's keys (values == false) or values, as f32: dst [e - b, D].
void KVRowsToF32(const KVLayerView& kv, bool values, int64_t h, int64_t b, int64_t e, float* dst);
}  // namespace fast

// out[T, hidden] = rows of the embedding table (any float dtype), as f32. Shared by both.
void EmbedRows(const Weight& table, const int32_t* ids, int64_t T, float* out);

// The spans of item (t, h): those of `spans`, or the dense causal range of query t.
void ItemSpans(const AttnArgs& a, const AttnSpans* spans, int64_t t, int64_t h,
               std::vector<KeySpan>* out);

// cos/sin table [T, D/2] for Rope: angle in f32 as transformers computes it, cos/sin evaluated
// in double of that angle, times `scaling`. Shared by both implementations.
void RopeTable(int64_t T, int64_t D, int64_t pos0, const float* inv_freq, float scaling,
               float* cos_out, float* sin_out);

}  // namespace needle
