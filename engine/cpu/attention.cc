// Attention over the block KV cache, dense (every visible key, causal, optional sliding window)
// or sparse (the key spans of a plan), for prefill and decode: the fused block kernel.
// Work items are (query token, KV head, key split). Each item walks its spans block by block;
// a block's rows are read once for all G query heads of the GQA group (converted to f32 in a
// small per-thread tile when stored as f16/bf16/int8), folded with an online softmax into one
// PartialAttention per head; the splits of one (token, head) merge in split order, so results
// are independent of scheduling. Keys are split across items only when tokens x KV heads alone
// cannot feed the threads (long-context decode). Prompts with unsplit keys fold by groups of
// tokens instead (prompt_groups.h).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "engine/attention/partial.h"
#include "engine/base/error.h"
#include "engine/base/switches.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/bf16dot.h"
#include "engine/cpu/fold_clock.h"
#include "engine/cpu/ops.h"
#include "engine/cpu/prompt_groups.h"
#include "engine/cpu/with_size.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/attention.cc"
#include "hwy/cache_control.h"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

// Per-target code shared between op families (after highway.h, as Highway requires).
#include "engine/cpu/kv_rows-inl.h"
#include "engine/cpu/load-inl.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace needle {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr int64_t kMinSplitKeys = 512;  // never split an item's keys finer than this

// A block piece's rows (K and V, `rows` x `row_bytes` each). While a fold computes a piece's
// scores, key row r of the next piece and value row r of its own are fetched into the cache: the
// kernel is compute-bound per core, so without it each piece would wait for DRAM and then
// compute, instead of both at once. (The first piece's keys come in with the hardware's
// prefetcher: they are read in order.)
struct NextRows {
  const uint8_t* k = nullptr;
  int64_t rows = 0, row_bytes = 0;
};
struct Prefetch {
  const uint8_t* next_k = nullptr;                                     // the next piece's keys
  const uint8_t* own_v = nullptr;                                      // this piece's values
  int64_t next_rows = 0, next_bytes = 0, own_rows = 0, own_bytes = 0;  // rows, bytes per row
  HWY_INLINE void Fetch(int64_t r) const {
    if (r < next_rows)
      for (int64_t o = 0; o < next_bytes; o += 64) hwy::Prefetch(next_k + r * next_bytes + o);
    if (r < own_rows)
      for (int64_t o = 0; o < own_bytes; o += 64) hwy::Prefetch(own_v + r * own_bytes + o);
  }
};

// Lane i of the result = the sum of the lanes of v[i], for L = Lanes(df) vectors v[0 .. L) (which
// it overwrites): a tree of pairwise even/odd sums, 3(L - 1) operations for L dot products
// instead of a horizontal reduction each.
template <class DF>
HWY_INLINE hn::Vec<DF> SumEach(DF df, hn::Vec<DF>* HWY_RESTRICT v) {
#if HWY_TARGET == HWY_SCALAR
  return v[0];
#else
  for (size_t n = hn::Lanes(df); n > 1; n /= 2)
    for (size_t i = 0; i < n / 2; ++i)
      v[i] = hn::Add(hn::ConcatEven(df, v[2 * i + 1], v[2 * i]),
                     hn::ConcatOdd(df, v[2 * i + 1], v[2 * i]));
  return v[0];
#endif
}

// The lane-wise products q_g . k over D channels of GG heads q [GG, D] (rows D apart) with one
// key row k [D]: acc[g] holds head g's partial sums by lane (summed across lanes later). Each
// key vector is widened once and serves every head.
template <int GG, class DF, typename KT>
HWY_INLINE void KeyProducts(DF df, const float* HWY_RESTRICT q, const KT* HWY_RESTRICT k, int64_t D,
                            hn::Vec<DF>* HWY_RESTRICT acc) {
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<DF> a[GG], b[GG];  // two chains per head (even / odd vectors of channels)
  for (int g = 0; g < GG; ++g) a[g] = b[g] = hn::Zero(df);
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    const auto k0 = LoadF32(df, k + d), k1 = LoadF32(df, k + d + L);
    for (int g = 0; g < GG; ++g) {
      a[g] = hn::MulAdd(hn::LoadU(df, q + g * D + d), k0, a[g]);
      b[g] = hn::MulAdd(hn::LoadU(df, q + g * D + d + L), k1, b[g]);
    }
  }
  for (; d + L <= D; d += L) {
    const auto k0 = LoadF32(df, k + d);
    for (int g = 0; g < GG; ++g) a[g] = hn::MulAdd(hn::LoadU(df, q + g * D + d), k0, a[g]);
  }
  for (int g = 0; g < GG; ++g) acc[g] = hn::Add(a[g], b[g]);
}

// s[g, j] = scale * q_g . k_j for the GG heads from g0 and the keys [j0, j0 + jn), jn <= L:
// every key's products for all GG heads, then one SumEach per head over the chunk's keys.
// Channels past the last whole vector (D not a multiple of L) are added in scalar.
template <int GG, typename KT>
HWY_INLINE void ScoreChunk(const float* HWY_RESTRICT q, int64_t g0, const KT* HWY_RESTRICT k,
                           int64_t j0, int64_t jn, int64_t D, int64_t n, float scale,
                           float* HWY_RESTRICT s, const Prefetch& next) {
  const hn::ScalableTag<float> df;
  constexpr size_t kMaxL = hn::MaxLanes(hn::ScalableTag<float>());
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<decltype(df)> t[GG][kMaxL];
  for (int64_t r = 0; r < L; ++r) {
    hn::Vec<decltype(df)> acc[GG];
    if (g0 == 0) next.Fetch(j0 + r);
    if (r < jn) {
      KeyProducts<GG>(df, q + g0 * D, k + (j0 + r) * D, D, acc);
    } else {
      for (int g = 0; g < GG; ++g) acc[g] = hn::Zero(df);
    }
    for (int g = 0; g < GG; ++g) t[g][r] = acc[g];
  }
  const int64_t tail = D - D / L * L;
  const auto vs = hn::Set(df, scale);
  for (int g = 0; g < GG; ++g) {
    HWY_ALIGN float sums[kMaxL];
    hn::Store(hn::Mul(SumEach(df, t[g]), vs), df, sums);
    for (int64_t r = 0; r < jn; ++r) {
      float x = sums[r];
      for (int64_t dd = D - tail; dd < D; ++dd)
        x += scale * q[(g0 + g) * D + dd] * ScalarF32(k[(j0 + r) * D + dd]);
      s[(g0 + g) * n + j0 + r] = x;
    }
  }
}

// o_g[d0 .. d0 + 2L) = o_g * corr_g + sum_j p[g, j] v_j for GG heads from g0: the values stream
// through once per pair of vectors, each load serving GG heads from registers.
template <int GG, typename VT>
HWY_INLINE void ValueTile(const float* HWY_RESTRICT p, int64_t g0, const VT* HWY_RESTRICT v,
                          int64_t d0, int64_t D, int64_t n, PartialAttention* part,
                          const float* corr) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<decltype(df)> a0[GG], a1[GG];
  for (int g = 0; g < GG; ++g) a0[g] = a1[g] = hn::Zero(df);
  for (int64_t j = 0; j < n; ++j) {
    const auto v0 = LoadF32(df, v + j * D + d0);
    const auto v1 = LoadF32(df, v + j * D + d0 + L);
    for (int g = 0; g < GG; ++g) {
      const auto b = hn::Set(df, p[(g0 + g) * n + j]);
      a0[g] = hn::MulAdd(b, v0, a0[g]);
      a1[g] = hn::MulAdd(b, v1, a1[g]);
    }
  }
  for (int g = 0; g < GG; ++g) {
    float* o = part[g0 + g].out + d0;
    const auto c = hn::Set(df, corr[g0 + g]);
    hn::StoreU(hn::MulAdd(hn::LoadU(df, o), c, a0[g]), df, o);
    hn::StoreU(hn::MulAdd(hn::LoadU(df, o + L), c, a1[g]), df, o + L);
  }
}

// Up to 8 heads per register tile (the whole GQA group of most models: one pass over the rows).
constexpr int64_t kHeadTile = 8;

// Folds n keys/values (rows [n, D] of f32, bf16 or f16, widened as they are read) into the
// partials of G query heads q [G, D]; `after` (the piece folded next) is prefetched meanwhile.
template <typename ST>
HWY_INLINE void FoldRows(const float* HWY_RESTRICT q, int64_t G, int64_t D,
                         const ST* HWY_RESTRICT k, const ST* HWY_RESTRICT v, int64_t n, float scale,
                         PartialAttention* part, float* HWY_RESTRICT scores /* [G, n] */,
                         float* HWY_RESTRICT stats, const NextRows& after) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  Prefetch next;
  next.next_k = after.k, next.next_rows = after.rows, next.next_bytes = after.row_bytes;
  next.own_v = reinterpret_cast<const uint8_t*>(v), next.own_rows = n;
  next.own_bytes = D * static_cast<int64_t>(sizeof(ST));
  // Scores, L keys x up to kHeadTile heads at a time.
  for (int64_t j = 0; j < n; j += L)
    for (int64_t g = 0; g < G; g += kHeadTile)
      WithSize<kHeadTile>(G - g, [&](auto gt) HWY_ATTR {
        ScoreChunk<decltype(gt)::value>(q, g, k, j, std::min(L, n - j), D, n, scale, scores, next);
      });
  // Online softmax: new maximum, rescale factor, probabilities.
  float corr[64];
  NEEDLE_CHECK(G <= 64);
  for (int64_t g = 0; g < G; ++g) {
    PartialAttention& P = part[g];
    float* s = scores + g * n;
    float mx = P.m;
    int64_t jj = 0;
    if (n >= L) {
      auto vm = hn::LoadU(df, s);
      for (jj = L; jj + L <= n; jj += L) vm = hn::Max(vm, hn::LoadU(df, s + jj));
      mx = std::max(mx, hn::GetLane(hn::MaxOfLanes(df, vm)));
    }
    for (; jj < n; ++jj) mx = std::max(mx, s[jj]);
    corr[g] = P.empty() ? 0.0f : std::exp(P.m - mx);
    float sum = 0.0f;
    jj = 0;
    const auto vmx = hn::Set(df, mx);
    auto vsum = hn::Zero(df);
    for (; jj + L <= n; jj += L) {
      const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + jj), vmx));
      hn::StoreU(e, df, s + jj);
      vsum = hn::Add(vsum, e);
    }
    sum = ReduceF32(df, vsum);
    for (; jj < n; ++jj) sum += (s[jj] = std::exp(s[jj] - mx));
    P.l = P.l * corr[g] + sum;
    P.m = mx;
    P.n += n;
    // These n keys' own sums, relative to mx (>= their maximum): {m, l} per head.
    if (stats != nullptr) stats[2 * g] = mx, stats[2 * g + 1] = sum;
  }
  // Values: o = o * corr + P V, two vectors of channels at a time, up to kHeadTile heads in
  // registers.
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L)
    for (int64_t g = 0; g < G; g += kHeadTile)
      WithSize<kHeadTile>(G - g, [&](auto gt) HWY_ATTR {
        ValueTile<decltype(gt)::value>(scores, g, v, d, D, n, part, corr);
      });
  for (; d < D; ++d)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.0f;
      for (int64_t jj = 0; jj < n; ++jj) acc += scores[g * n + jj] * ScalarF32(v[jj * D + d]);
      part[g].out[d] = part[g].out[d] * corr[g] + acc;
    }
}

// Per-thread scratch: f32 tiles of one int8 block piece, and the piece's scores.
struct Scratch {
  std::vector<float> k, v, scores, qrot;
  std::vector<KeySpan> spans;
};

// This thread's scratch, large enough for a block of G heads' scores (and int8 tiles). Reused
// across calls: growing a buffer zero-fills it, which would cost more than the work.
HWY_INLINE Scratch& ThreadScratch(const KVLayerView& kv, int64_t G) {
  thread_local Scratch sc;
  const size_t B = static_cast<size_t>(kv.block_size), D = static_cast<size_t>(kv.head_dim);
  if (sc.scores.size() < static_cast<size_t>(G) * B) sc.scores.resize(static_cast<size_t>(G) * B);
  if (kv.dtype == DType::kI8 && sc.k.size() < B * D) {
    sc.k.resize(B * D);
    sc.v.resize(B * D);
  }
  return sc;
}

// The first block piece of keys [b, e) of KV head h, as rows to prefetch.
HWY_INLINE NextRows PieceAt(const KVLayerView& kv, int64_t h, int64_t b, int64_t e) {
  NextRows r;
  if (b >= e) return r;
  r.k = kv.KRow(h, b);
  r.rows = std::min(e, (b / kv.block_size + 1) * kv.block_size) - b;
  r.row_bytes = kv.head_dim * static_cast<int64_t>(DTypeSize(kv.dtype));
  return r;
}

// Folds keys [b, e) of KV head h (any storage type) block piece by block piece, prefetching each
// next piece, and `after` (what the caller folds next) during the last.
// stats (optional, [G][2]): the sums of the last piece folded (a whole block when [b, e) is one).
HWY_INLINE void FoldRange(const KVLayerView& kv, int64_t h, int64_t b, int64_t e, const float* q,
                          int64_t G, float scale, PartialAttention* part, Scratch& sc,
                          float* stats = nullptr, const NextRows& after = NextRows()) {
  const int64_t B = kv.block_size, D = kv.head_dim;
  while (b < e) {
    const int64_t n = std::min(e, (b / B + 1) * B) - b;  // rows left in this block
    const NextRows next = b + n < e ? PieceAt(kv, h, b + n, e) : after;
    switch (kv.dtype) {
      case DType::kF32:
        FoldRows(q, G, D, reinterpret_cast<const float*>(kv.KRow(h, b)),
                 reinterpret_cast<const float*>(kv.VRow(h, b)), n, scale, part, sc.scores.data(),
                 stats, next);
        break;
      case DType::kBF16:
        FoldRows(q, G, D, reinterpret_cast<const hwy::bfloat16_t*>(kv.KRow(h, b)),
                 reinterpret_cast<const hwy::bfloat16_t*>(kv.VRow(h, b)), n, scale, part,
                 sc.scores.data(), stats, next);
        break;
      case DType::kF16:
        FoldRows(q, G, D, reinterpret_cast<const hwy::float16_t*>(kv.KRow(h, b)),
                 reinterpret_cast<const hwy::float16_t*>(kv.VRow(h, b)), n, scale, part,
                 sc.scores.data(), stats, next);
        break;
      default:  // int8 (validated at cache creation): dequantise the piece into f32 tiles first
        RowsToF32(reinterpret_cast<const int8_t*>(kv.KRow(h, b)), kv.KScale(h, b), n, D, kv.groups,
                  sc.k.data());
        RowsToF32(reinterpret_cast<const int8_t*>(kv.VRow(h, b)), kv.VScale(h, b), n, D, kv.groups,
                  sc.v.data());
        FoldRows(q, G, D, sc.k.data(), sc.v.data(), n, scale, part, sc.scores.data(), stats, next);
        break;
    }
    b += n;
  }
}

void KVRowsToF32Impl(const KVLayerView& kv, bool values, int64_t h, int64_t b, int64_t e,
                     float* dst) {
  KVRowsToF32InTarget(kv, values, h, b, e, dst);
}

void AttentionImpl(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                   float* out, float* lse, ThreadingContext& tc) {
  const int64_t D = a.head_dim, G = a.heads / a.kv_heads, Hk = a.kv_heads;
  const int64_t items = a.T * Hk;
  // Keys per item (for the split decision) and the largest.
  int64_t max_keys = 0;
  {
    std::vector<KeySpan> sp;
    for (int64_t i = 0; i < items; ++i) {
      ItemSpans(a, spans, i / Hk, i % Hk, &sp);
      int64_t n = 0;
      for (const auto& r : sp) n += r.end - r.begin;
      max_keys = std::max(max_keys, n);
    }
  }
  int64_t splits = 1;
  const int64_t want = 4 * tc.threads();
  if (items < want)
    splits = std::max<int64_t>(
        1, std::min((want + items - 1) / items, (max_keys + kMinSplitKeys - 1) / kMinSplitKeys));
  // Partials: [items, splits, G] with outputs [.., D].
  std::vector<float> pbuf(static_cast<size_t>(items * splits * G * D));
  std::vector<PartialAttention> parts(static_cast<size_t>(items * splits * G));
  // Prompts: groups of consecutive tokens fold the keys they share once for all their rows
  // (prompt_groups.h), each piece of keys read from the caches by many queries (compute-bound):
  // on a bf16 cache with the AMX tiles (amx.h) or, without them, AVX512-BF16 dot products
  // (bf16dot.h) where the CPU has them; else with the Highway row tile.
  if (a.T > 1 && splits == 1) {
    for (size_t i = 0; i < parts.size(); ++i) parts[i] = PartialAttention(pbuf.data() + i * D, D);
    if (kv.dtype == DType::kBF16 && amx::Use(G, D, true))
      amx::FoldPrompt(q, kv, a, spans, parts.data(), tc);
    else if (kv.dtype == DType::kBF16 && bf16dot::Use(D))
      bf16dot::FoldPrompt(q, kv, a, spans, parts.data(), tc);
    else
      fast::FoldPromptRows(q, kv, a, spans, parts.data(), tc);
  } else {
    tc.ParallelFor(static_cast<size_t>(items * splits), 1, [&](size_t b, size_t e) HWY_ATTR {
      Scratch& sc = ThreadScratch(kv, G);
      for (size_t w = b; w < e; ++w) {
        const int64_t sp = static_cast<int64_t>(w) % splits,
                      item = static_cast<int64_t>(w) / splits;
        const int64_t t = item / Hk, h = item % Hk;
        ItemSpans(a, spans, t, h, &sc.spans);
        int64_t n = 0;
        for (const auto& r : sc.spans) n += r.end - r.begin;
        const int64_t per = (n + splits - 1) / splits;
        const int64_t k0 = std::min(n, sp * per),
                      k1 = std::min(n, k0 + per);  // key indices of this split
        PartialAttention* p = &parts[w * G];
        for (int64_t g = 0; g < G; ++g) p[g] = PartialAttention(pbuf.data() + (w * G + g) * D, D);
        const float* qg = q + (t * a.heads + h * G) * D;
        int64_t seen = 0;
        for (size_t x = 0; x < sc.spans.size(); ++x) {
          const KeySpan& r = sc.spans[x];
          const int64_t len = r.end - r.begin;
          const int64_t lo = std::max(k0, seen), hi = std::min(k1, seen + len);
          NextRows after;  // the next span's first piece, when this split reads it
          if (x + 1 < sc.spans.size() && seen + len < k1) {
            const KeySpan& r2 = sc.spans[x + 1];
            after = PieceAt(kv, h, r2.begin, std::min(r2.end, r2.begin + (k1 - seen - len)));
          }
          const int32_t rot = spans != nullptr && !spans->rot.empty()
                                  ? spans->rot[spans->offsets[t * Hk + h] + static_cast<int64_t>(x)]
                                  : -1;
          const float* qs = qg;
          if (rot >= 0 && lo < hi) {  // position remapping: this span's rotation of the queries
            sc.qrot.resize(static_cast<size_t>(G * D));
            RotateRows(qg, G, D, spans->rot_table.data() + rot * D, sc.qrot.data());
            qs = sc.qrot.data();
          }
          if (lo < hi)
            FoldRange(kv, h, r.begin + (lo - seen), r.begin + (hi - seen), qs, G, a.scale, p, sc,
                      nullptr, after);
          seen += len;
          if (seen >= k1) break;
        }
      }
    });
  }
  tc.ParallelFor(static_cast<size_t>(items), 4, [&](size_t b, size_t e) {
    for (size_t item = b; item < e; ++item) {
      const int64_t t = static_cast<int64_t>(item) / Hk, h = static_cast<int64_t>(item) % Hk;
      for (int64_t g = 0; g < G; ++g) {
        PartialAttention& acc = parts[static_cast<size_t>((item * splits) * G + g)];
        for (int64_t sp = 1; sp < splits; ++sp)
          acc.Merge(parts[static_cast<size_t>((item * splits + sp) * G + g)]);
        const int64_t head = h * G + g;
        acc.Finalize(out + (t * a.heads + head) * D);
        if (lse != nullptr)
          lse[t * a.heads + head] = acc.empty() ? -INFINITY : acc.m + std::log(acc.l);
      }
    }
  });
}

void AttendBlocksImpl(const float* q, const KVLayerView& kv, const AttnArgs& a,
                      const std::vector<std::vector<int32_t>>& blocks, float* out, float* lse,
                      std::vector<float>* stats, ThreadingContext& tc, fast::FoldTimes* times) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t_in = times != nullptr ? Clock::now() : Clock::time_point{};
  const int64_t D = a.head_dim, G = a.heads / a.kv_heads, Hk = a.kv_heads, B = kv.block_size;
  // The call's bookkeeping, kept by the calling thread so that a step's calls allocate nothing
  // (the workers use the references below: in the lambda `book` would be each thread's own).
  struct Item {
    int64_t h, i0, i1;
  };
  struct Bookkeeping {
    std::vector<int64_t> base;
    std::vector<Item> items;
    std::vector<size_t> first;
    std::vector<float> pbuf;
    std::vector<PartialAttention> parts;
    std::vector<amx::Query> tq;
    std::vector<bf16dot::Query> dq;
    std::unique_ptr<std::atomic<int64_t>[]> left;
    int64_t left_n = 0;
  };
  thread_local Bookkeeping book;
  std::vector<int64_t>& base = book.base;  // first block of head h overall
  base.assign(static_cast<size_t>(Hk + 1), 0);
  for (int64_t h = 0; h < Hk; ++h) base[h + 1] = base[h] + static_cast<int64_t>(blocks[h].size());
  stats->resize(static_cast<size_t>(base[Hk] * G * 2));
  // Items: runs of `per` blocks of one head, about four per thread (a thread that starts late
  // or runs slow leaves less behind than with one or two each).
  const int64_t per = std::max<int64_t>(1, (base[Hk] + 4 * tc.threads() - 1) / (4 * tc.threads()));
  std::vector<Item>& items = book.items;
  items.clear();
  std::vector<size_t>& first = book.first;  // head h's items: [first[h], first[h+1])
  first.resize(static_cast<size_t>(Hk + 1));
  for (int64_t h = 0; h < Hk; ++h) {
    first[h] = items.size();
    for (int64_t i = 0; i < static_cast<int64_t>(blocks[h].size()); i += per)
      items.push_back({h, i, std::min<int64_t>(i + per, static_cast<int64_t>(blocks[h].size()))});
  }
  first[Hk] = items.size();
  // The items' partial outputs: each item zeroes its own (PartialAttention's constructor, in
  // parallel); the buffer grows and stays (Qwen2.5-7B's heads with 16 threads: 229 KB a call).
  if (book.pbuf.size() < items.size() * static_cast<size_t>(G * D))
    book.pbuf.resize(items.size() * static_cast<size_t>(G * D));
  float* const pb = book.pbuf.data();
  std::vector<PartialAttention>& parts = book.parts;  // (each set by its item before any read)
  parts.resize(items.size() * static_cast<size_t>(G));
  // bf16 caches on a CPU with AMX: the tile fold (amx.h); without, AVX512-BF16 dot products
  // where the CPU has them (bf16dot.h); their queries prepared once per head.
  const bool tiles = kv.dtype == DType::kBF16 && amx::Use(G, D);
  const bool dots = !tiles && kv.dtype == DType::kBF16 && bf16dot::UseBlocks(G, D);
  std::vector<amx::Query>& tq = book.tq;
  tq.resize(tiles ? static_cast<size_t>(Hk) : 0);
  for (int64_t h = 0; h < static_cast<int64_t>(tq.size()); ++h)
    amx::PrepareQuery(q + h * G * D, G, D, a.scale, &tq[h]);
  std::vector<bf16dot::Query>& dq = book.dq;
  dq.resize(dots ? static_cast<size_t>(Hk) : 0);
  for (int64_t h = 0; h < static_cast<int64_t>(dq.size()); ++h)
    bf16dot::PrepareQuery(q + h * G * D, G, D, a.scale, &dq[h]);
  // Each head's items merge in block order (independent of scheduling), so the bits are the
  // same whoever merges. NEEDLE_CPU_MERGE (read once; for comparisons): 2 (the default) by the
  // thread that folds a head's last item, inside the fold (no second pass over the threads to
  // wait for, heads merged while others still fold); 1 in a second parallel pass, a (head, query)
  // pair a task; 0 all on this thread after the fold.
  static const int merge_mode = EnvSwitch("NEEDLE_CPU_MERGE", 2);
  const auto merge_pair = [&](int64_t h, int64_t g) {  // (of a head with blocks)
    PartialAttention& acc = parts[first[h] * G + g];
    for (size_t x = first[h] + 1; x < first[h + 1]; ++x) acc.Merge(parts[x * G + g]);
    acc.Finalize(out + (h * G + g) * D);
    lse[h * G + g] = acc.empty() ? -INFINITY : acc.m + std::log(acc.l);
  };
  // (Heads without blocks: zeros and -inf, here. The others' items left to fold, by head.)
  if (book.left_n < Hk) book.left.reset(new std::atomic<int64_t>[static_cast<size_t>(Hk)]);
  book.left_n = std::max(book.left_n, Hk);
  std::atomic<int64_t>* const left = book.left.get();
  for (int64_t h = 0; h < Hk; ++h) {
    left[h].store(static_cast<int64_t>(first[h + 1] - first[h]), std::memory_order_relaxed);
    if (first[h] != first[h + 1]) continue;
    std::fill(out + h * G * D, out + (h + 1) * G * D, 0.f);
    std::fill(lse + h * G, lse + (h + 1) * G, -INFINITY);
  }
  FoldClock clock(times != nullptr);
  const Clock::time_point t_fold = clock.on() ? Clock::now() : Clock::time_point{};
  tc.ParallelFor(items.size(), 1, [&](size_t b, size_t e) HWY_ATTR {
    Clock::rep tick = clock.on() ? clock.Chunk() : 0;
    amx::Folder& folder = amx::ThreadFolder();
    bf16dot::BlockFolder& dot_folder = bf16dot::ThreadBlockFolder();
    if (tiles) folder.Begin();
    Scratch& sc = ThreadScratch(kv, G);
    for (size_t w = b; w < e; ++w) {
      const Item& it = items[w];
      PartialAttention* p = &parts[w * G];
      for (int64_t g = 0; g < G; ++g) p[g] = PartialAttention(pb + (w * G + g) * D, D);
      const float* qg = q + it.h * G * D;
      for (int64_t i = it.i0; i < it.i1; ++i) {
        const int64_t t0 = int64_t{blocks[it.h][i]} * B, t1 = std::min(t0 + B, kv.n_tokens);
        float* st = stats->data() + (base[it.h] + i) * G * 2;
        for (int64_t g = 0; g < G; ++g) st[2 * g] = -INFINITY, st[2 * g + 1] = 0.f;
        NextRows after;
        const uint8_t* after_v = nullptr;  // (the tile fold prefetches the values too)
        if (i + 1 < it.i1) {
          const int64_t n0 = int64_t{blocks[it.h][i + 1]} * B;
          after = PieceAt(kv, it.h, n0, std::min(n0 + B, kv.n_tokens));
          after_v = kv.VRow(it.h, n0);
        }
        if (t0 >= t1) continue;
        if (tiles)
          folder.Fold(tq[it.h], reinterpret_cast<const uint16_t*>(kv.KRow(it.h, t0)),
                      reinterpret_cast<const uint16_t*>(kv.VRow(it.h, t0)), t1 - t0, p, st,
                      reinterpret_cast<const uint16_t*>(after.k),
                      reinterpret_cast<const uint16_t*>(after_v), after.rows * after.row_bytes);
        else if (dots)
          dot_folder.Fold(dq[it.h], reinterpret_cast<const uint16_t*>(kv.KRow(it.h, t0)),
                          reinterpret_cast<const uint16_t*>(kv.VRow(it.h, t0)), t1 - t0, p, st,
                          reinterpret_cast<const uint16_t*>(after.k),
                          reinterpret_cast<const uint16_t*>(after_v), after.rows * after.row_bytes);
        else
          FoldRange(kv, it.h, t0, t1, qg, G, a.scale, p, sc, st, after);
      }
      // (acq_rel: the last one sees every other item's partial of the head.)
      if (merge_mode == 2 && left[it.h].fetch_sub(1, std::memory_order_acq_rel) == 1)
        for (int64_t g = 0; g < G; ++g) merge_pair(it.h, g);
      if (clock.on()) tick = clock.Item(tick);
    }
    if (tiles) folder.End();
  });
  // The merge after the fold (NEEDLE_CPU_MERGE 1 or 0; 420 merges of 128 floats for Qwen2.5-7B's
  // heads with 16 threads: 11 us on one dev core).
  const Clock::time_point t_merge = times != nullptr ? Clock::now() : Clock::time_point{};
  if (merge_mode != 2) {
    const size_t pairs = static_cast<size_t>(Hk * G);
    tc.ParallelFor(pairs, merge_mode == 1 ? 2 : pairs, [&](size_t b, size_t e) {
      for (size_t hg = b; hg < e; ++hg) {
        const auto h = static_cast<int64_t>(hg) / G;
        if (first[h] != first[h + 1]) merge_pair(h, static_cast<int64_t>(hg) % G);
      }
    });
  }
  if (times != nullptr) {
    const auto s = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
    const Clock::time_point end = Clock::now();
    times->setup += s(t_fold - t_in);
    times->calls += 1;
    clock.AddTo(times, t_fold);
    times->fold += s(t_merge - t_fold);
    times->merge += s(end - t_merge);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle {
HWY_EXPORT(AttentionImpl);
HWY_EXPORT(KVRowsToF32Impl);
HWY_EXPORT(AttendBlocksImpl);
namespace fast {
void AttendBlocks(const float* q, const KVLayerView& kv, const AttnArgs& a,
                  const std::vector<std::vector<int32_t>>& blocks, float* out, float* lse,
                  std::vector<float>* stats, ThreadingContext& tc, FoldTimes* times) {
  NEEDLE_CHECK(a.T == 1 && static_cast<int64_t>(blocks.size()) == a.kv_heads);
  HWY_DYNAMIC_DISPATCH(AttendBlocksImpl)(q, kv, a, blocks, out, lse, stats, tc, times);
}
void BlockMassFromStats(const std::vector<float>& stats, const float* lse, int64_t G,
                        const std::vector<std::vector<int32_t>>& blocks,
                        std::vector<std::vector<float>>* mass) {
  mass->resize(blocks.size());
  size_t k = 0;
  for (size_t h = 0; h < blocks.size(); ++h) {
    (*mass)[h].assign(blocks[h].size(), 0.f);
    for (size_t i = 0; i < blocks[h].size(); ++i)
      for (int64_t g = 0; g < G; ++g, k += 2) {
        const float l = lse[static_cast<int64_t>(h) * G + g];
        if (stats[k + 1] > 0.f && l != -INFINITY)
          (*mass)[h][i] += stats[k + 1] * std::exp(stats[k] - l);
      }
  }
}
void KVRowsToF32(const KVLayerView& kv, bool values, int64_t h, int64_t b, int64_t e, float* dst) {
  HWY_DYNAMIC_DISPATCH(KVRowsToF32Impl)(kv, values, h, b, e, dst);
}
void Attention(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
               float* out, float* lse, ThreadingContext& tc) {
  if (kv.dtype != DType::kF32 && kv.dtype != DType::kBF16 && kv.dtype != DType::kF16 &&
      kv.dtype != DType::kI8)
    Fail("attention: unsupported KV cache type ", DTypeName(kv.dtype));
  HWY_DYNAMIC_DISPATCH(AttentionImpl)(q, kv, a, spans, out, lse, tc);
}
}  // namespace fast
}  // namespace needle
#endif
