// Attention over the block KV cache, dense (every visible key, causal, optional sliding window)
// or sparse (the key spans of a plan), for prefill and decode: the fused block kernel.
// Work items are (query token, KV head, key split). Each item walks its spans block by block;
// a block's rows are read once for all G query heads of the GQA group (converted to f32 in a
// small per-thread tile when stored as f16/bf16/int8), folded with an online softmax into one
// PartialAttention per head; the splits of one (token, head) merge in split order, so results
// are independent of scheduling. Keys are split across items only when tokens x KV heads alone
// cannot feed the threads (long-context decode).
#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/attention/partial.h"
#include "engine/base/error.h"
#include "engine/cpu/ops.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/attention.cc"
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

// s[g, j0 + r] = scale * q_g . k_{j0 + r} for GG heads starting at g0 and RJ rows starting at j0:
// a register tile of GG x RJ accumulators; each key vector load serves GG heads, each query
// vector load RJ keys.
template <int GG, int RJ, typename KT>
HWY_INLINE void ScoreTile(const float* HWY_RESTRICT q, int64_t g0, const KT* HWY_RESTRICT k,
                          int64_t j0, int64_t D, int64_t n, float scale, float* HWY_RESTRICT s) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  hn::Vec<decltype(df)> acc[GG][RJ];
  for (int g = 0; g < GG; ++g)
    for (int r = 0; r < RJ; ++r) acc[g][r] = hn::Zero(df);
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    hn::Vec<decltype(df)> kv[RJ];
    for (int r = 0; r < RJ; ++r) kv[r] = LoadF32(df, k + (j0 + r) * D + d);
    for (int g = 0; g < GG; ++g) {
      const auto qv = hn::LoadU(df, q + (g0 + g) * D + d);
      for (int r = 0; r < RJ; ++r) acc[g][r] = hn::MulAdd(qv, kv[r], acc[g][r]);
    }
  }
  for (int g = 0; g < GG; ++g)
    for (int r = 0; r < RJ; ++r) {
      float t = ReduceF32(df, acc[g][r]);
      for (int64_t dd = d; dd < D; ++dd)
        t += q[(g0 + g) * D + dd] * ScalarF32(k[(j0 + r) * D + dd]);
      s[(g0 + g) * n + j0 + r] = t * scale;
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

// Folds n keys/values (rows [n, D] of f32, bf16 or f16, widened as they are read) into the
// partials of G query heads q [G, D].
template <typename ST>
HWY_INLINE void FoldRows(const float* HWY_RESTRICT q, int64_t G, int64_t D,
                         const ST* HWY_RESTRICT k, const ST* HWY_RESTRICT v, int64_t n, float scale,
                         PartialAttention* part, float* HWY_RESTRICT scores /* [G, n] */,
                         float* HWY_RESTRICT stats = nullptr) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  // Scores, in tiles of 2 heads x 4 keys.
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) ScoreTile<2, 4>(q, g, k, j, D, n, scale, scores);
    if (g < G) ScoreTile<1, 4>(q, g, k, j, D, n, scale, scores);
  }
  for (; j < n; ++j) {
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) ScoreTile<2, 1>(q, g, k, j, D, n, scale, scores);
    if (g < G) ScoreTile<1, 1>(q, g, k, j, D, n, scale, scores);
  }
  // Online softmax: new maximum, rescale factor, probabilities.
  float corr[64];
  NEEDLE_CHECK(G <= 64);
  for (int64_t g = 0; g < G; ++g) {
    PartialAttention& P = part[g];
    float* s = scores + g * n;
    float mx = P.m;
    for (int64_t jj = 0; jj < n; ++jj) mx = std::max(mx, s[jj]);
    corr[g] = P.empty() ? 0.0f : std::exp(P.m - mx);
    float sum = 0.0f;
    int64_t jj = 0;
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
  // Values: o = o * corr + P V, two vectors of channels at a time, up to 4 heads in registers.
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) ValueTile<4>(scores, g, v, d, D, n, part, corr);
    for (; g + 2 <= G; g += 2) ValueTile<2>(scores, g, v, d, D, n, part, corr);
    if (g < G) ValueTile<1>(scores, g, v, d, D, n, part, corr);
  }
  for (; d < D; ++d)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.0f;
      for (int64_t jj = 0; jj < n; ++jj) acc += scores[g * n + jj] * ScalarF32(v[jj * D + d]);
      part[g].out[d] = part[g].out[d] * corr[g] + acc;
    }
}

// Per-thread scratch: f32 tiles of one int8 block piece, and the piece's scores.
struct Scratch {
  std::vector<float> k, v, scores;
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

// Folds keys [b, e) of KV head h (any storage type) block piece by block piece.
// stats (optional, [G][2]): the sums of the last piece folded (a whole block when [b, e) is one).
HWY_INLINE void FoldRange(const KVLayerView& kv, int64_t h, int64_t b, int64_t e, const float* q,
                          int64_t G, float scale, PartialAttention* part, Scratch& sc,
                          float* stats = nullptr) {
  const int64_t B = kv.block_size, D = kv.head_dim;
  while (b < e) {
    const int64_t n = std::min(e, (b / B + 1) * B) - b;  // rows left in this block
    switch (kv.dtype) {
      case DType::kF32:
        FoldRows(q, G, D, reinterpret_cast<const float*>(kv.KRow(h, b)),
                 reinterpret_cast<const float*>(kv.VRow(h, b)), n, scale, part, sc.scores.data(),
                 stats);
        break;
      case DType::kBF16:
        FoldRows(q, G, D, reinterpret_cast<const hwy::bfloat16_t*>(kv.KRow(h, b)),
                 reinterpret_cast<const hwy::bfloat16_t*>(kv.VRow(h, b)), n, scale, part,
                 sc.scores.data(), stats);
        break;
      case DType::kF16:
        FoldRows(q, G, D, reinterpret_cast<const hwy::float16_t*>(kv.KRow(h, b)),
                 reinterpret_cast<const hwy::float16_t*>(kv.VRow(h, b)), n, scale, part,
                 sc.scores.data(), stats);
        break;
      default:  // int8 (validated at cache creation): dequantise the piece into f32 tiles first
        RowsToF32(reinterpret_cast<const int8_t*>(kv.KRow(h, b)), kv.KScale(h, b), n, D, kv.groups,
                  sc.k.data());
        RowsToF32(reinterpret_cast<const int8_t*>(kv.VRow(h, b)), kv.VScale(h, b), n, D, kv.groups,
                  sc.v.data());
        FoldRows(q, G, D, sc.k.data(), sc.v.data(), n, scale, part, sc.scores.data(), stats);
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
  tc.ParallelFor(static_cast<size_t>(items * splits), 1, [&](size_t b, size_t e) HWY_ATTR {
    Scratch& sc = ThreadScratch(kv, G);
    for (size_t w = b; w < e; ++w) {
      const int64_t sp = static_cast<int64_t>(w) % splits, item = static_cast<int64_t>(w) / splits;
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
      for (const auto& r : sc.spans) {
        const int64_t len = r.end - r.begin;
        const int64_t lo = std::max(k0, seen), hi = std::min(k1, seen + len);
        if (lo < hi)
          FoldRange(kv, h, r.begin + (lo - seen), r.begin + (hi - seen), qg, G, a.scale, p, sc);
        seen += len;
        if (seen >= k1) break;
      }
    }
  });
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
                      std::vector<float>* stats, ThreadingContext& tc) {
  const int64_t D = a.head_dim, G = a.heads / a.kv_heads, Hk = a.kv_heads, B = kv.block_size;
  std::vector<int64_t> base(static_cast<size_t>(Hk + 1), 0);  // first block of head h overall
  for (int64_t h = 0; h < Hk; ++h) base[h + 1] = base[h] + static_cast<int64_t>(blocks[h].size());
  stats->resize(static_cast<size_t>(base[Hk] * G * 2));
  // Items: runs of `per` blocks of one head, about two per thread.
  const int64_t per = std::max<int64_t>(1, (base[Hk] + 2 * tc.threads() - 1) / (2 * tc.threads()));
  struct Item {
    int64_t h, i0, i1;
  };
  std::vector<Item> items;
  for (int64_t h = 0; h < Hk; ++h)
    for (int64_t i = 0; i < static_cast<int64_t>(blocks[h].size()); i += per)
      items.push_back({h, i, std::min<int64_t>(i + per, static_cast<int64_t>(blocks[h].size()))});
  std::vector<float> pbuf(items.size() * static_cast<size_t>(G * D));
  std::vector<PartialAttention> parts(items.size() * static_cast<size_t>(G));
  tc.ParallelFor(items.size(), 1, [&](size_t b, size_t e) HWY_ATTR {
    Scratch& sc = ThreadScratch(kv, G);
    for (size_t w = b; w < e; ++w) {
      const Item& it = items[w];
      PartialAttention* p = &parts[w * G];
      for (int64_t g = 0; g < G; ++g) p[g] = PartialAttention(pbuf.data() + (w * G + g) * D, D);
      const float* qg = q + it.h * G * D;
      for (int64_t i = it.i0; i < it.i1; ++i) {
        const int64_t t0 = int64_t{blocks[it.h][i]} * B, t1 = std::min(t0 + B, kv.n_tokens);
        float* st = stats->data() + (base[it.h] + i) * G * 2;
        for (int64_t g = 0; g < G; ++g) st[2 * g] = -INFINITY, st[2 * g + 1] = 0.f;
        if (t0 < t1) FoldRange(kv, it.h, t0, t1, qg, G, a.scale, p, sc, st);
      }
    }
  });
  // Each head's items merge in block order (independent of scheduling).
  for (size_t w = 0; w < items.size(); ++w) {
    const int64_t h = items[w].h;
    if (w > 0 && items[w - 1].h == h) continue;
    for (int64_t g = 0; g < G; ++g) {
      PartialAttention& acc = parts[w * G + g];
      for (size_t x = w + 1; x < items.size() && items[x].h == h; ++x) acc.Merge(parts[x * G + g]);
      acc.Finalize(out + (h * G + g) * D);
      lse[h * G + g] = acc.empty() ? -INFINITY : acc.m + std::log(acc.l);
    }
  }
  for (int64_t h = 0; h < Hk; ++h)  // heads without blocks
    if (blocks[h].empty())
      for (int64_t g = 0; g < G; ++g) {
        std::fill(out + (h * G + g) * D, out + (h * G + g + 1) * D, 0.f);
        lse[h * G + g] = -INFINITY;
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
                  std::vector<float>* stats, ThreadingContext& tc) {
  NEEDLE_CHECK(a.T == 1 && static_cast<int64_t>(blocks.size()) == a.kv_heads);
  HWY_DYNAMIC_DISPATCH(AttendBlocksImpl)(q, kv, a, blocks, out, lse, stats, tc);
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
