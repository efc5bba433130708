#include "sparse_attn/best_key.h"

#include <algorithm>
#include <cmath>

#include "engine/base/error.h"
#include "engine/cpu/ops.h"
#include "sparse_attn/observation.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "sparse_attn/best_key.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

// Per-target code shared between op families (after highway.h, as Highway requires).
#include "engine/cpu/load-inl.h"

HWY_BEFORE_NAMESPACE();
namespace needle {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// out [a.n] for KV heads [h0, h1): qs [(h1 - h0), D] the combined queries. The keys are read as
// f32 rows (any cache dtype); with the remap, R(-b B) k . q = k . R(b B) q, so the query turns
// once per block instead of every key.
// Blocks [j0, j1) of a.blocks only (one ParallelFor piece).
void BestKeysImpl(const ScoreArgs& a, const KVLayerView& kv, const float* relative_freq, int64_t h0,
                  int64_t h1, const float* qs, int64_t j0, int64_t j1, float* out) {
  const int64_t D = a.head_dim, B = kv.block_size;
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  std::vector<float> rows(static_cast<size_t>(B * D)), turn, qb;
  if (relative_freq != nullptr) {
    turn.resize(static_cast<size_t>(D));
    qb.resize(static_cast<size_t>((h1 - h0) * D));
  }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t b = a.blocks[j];
    NEEDLE_CHECK((b + 1) * B <= kv.n_tokens);
    const float* qv = qs;
    if (relative_freq != nullptr) {
      RotationRow(b * B, relative_freq, D, turn.data());
      RotateRows(qs, h1 - h0, D, turn.data(), qb.data());
      qv = qb.data();
    }
    float total = 0.f;
    for (int64_t h = h0; h < h1; ++h) {
      fast::KVRowsToF32(kv, false, h, b * B, (b + 1) * B, rows.data());
      const float* q = qv + (h - h0) * D;
      float best = -INFINITY;
      for (int64_t r = 0; r < B; ++r) {
        const float* k = rows.data() + r * D;
        auto acc = hn::Zero(df);
        int64_t d = 0;
        for (; d + L <= D; d += L)
          acc = hn::MulAdd(hn::LoadU(df, q + d), hn::LoadU(df, k + d), acc);
        float dot = ReduceF32(df, acc);
        for (; d < D; ++d) dot += q[d] * k[d];
        best = std::max(best, dot);
      }
      total += best;
    }
    out[j] = total;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle {

HWY_EXPORT(BestKeysImpl);

void BestKeyScores(const ScoreArgs& a, const float* qs, const KVLayerView& kv,
                   const float* relative_freq, int64_t kv_head, ThreadingContext& tc, float* out) {
  const int64_t D = a.head_dim, Hk = a.kv_heads;
  const int64_t h0 = kv_head < 0 ? 0 : kv_head, h1 = kv_head < 0 ? Hk : kv_head + 1;
  NEEDLE_CHECK(h0 >= 0 && h1 <= Hk && kv.kv_heads == Hk && kv.head_dim == D);
  // Each KV head's queries combined as scoring combines them (scoring.h; the plain sum).
  std::vector<float> own;
  if (qs == nullptr) {
    own.resize(static_cast<size_t>(Hk * D));
    std::vector<float> unused(own.size());
    GroupQueries(a, false, own.data(), unused.data());
    qs = own.data();
  }
  // In pieces of blocks over the threads (a shortlist of 128 blocks of 128 keys is 16K keys a KV
  // head: alone on one thread it cost more than the rest of a needle-tiny decode step).
  const auto impl = HWY_DYNAMIC_DISPATCH(BestKeysImpl);
  const float* qh = qs + h0 * D;
  tc.ParallelFor(static_cast<size_t>(a.n), 4, [&](size_t j0, size_t j1) {
    impl(a, kv, relative_freq, h0, h1, qh, static_cast<int64_t>(j0), static_cast<int64_t>(j1), out);
  });
}

std::vector<float> CombineQuerySums(const std::vector<float>& qa, const std::vector<float>& qb) {
  NEEDLE_CHECK(qa.size() == qb.size());
  std::vector<float> qs(qa.size());
  for (size_t i = 0; i < qa.size(); ++i) qs[i] = qa[i] + qb[i];
  return qs;
}

std::vector<int32_t> RankCandidates(const float* scores, const int32_t* ids, int64_t n,
                                    int64_t want, int64_t rescore, const ScoreArgs& a,
                                    const float* qs, const KVLayerView& kv,
                                    const float* relative_freq, int64_t kv_head,
                                    ThreadingContext& tc) {
  if (rescore <= want || n <= want) return TopK(scores, ids, n, want);
  std::vector<int32_t> shortlist = TopK(scores, ids, n, rescore);
  ScoreArgs sa = a;
  sa.blocks = shortlist.data();
  sa.n = static_cast<int64_t>(shortlist.size());
  std::vector<float> best(shortlist.size());
  BestKeyScores(sa, qs, kv, relative_freq, kv_head, tc, best.data());
  return TopK(best.data(), shortlist.data(), sa.n, want);
}

}  // namespace needle
#endif
