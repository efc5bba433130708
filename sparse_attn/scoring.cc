#include "sparse_attn/scoring.h"

#include <algorithm>
#include <vector>

#include "engine/base/error.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "sparse_attn/scoring.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

// Per-target code shared between op families (after highway.h, as Highway requires).
#include "engine/cpu/load-inl.h"

HWY_BEFORE_NAMESPACE();
namespace needle {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Quest's bound is linear once the query is split by sign: for max_c >= min_c,
//   max(q_c * max_c, q_c * min_c) = max(q_c, 0) * max_c + min(q_c, 0) * min_c,
// so summing over the group's queries first turns it into two dot products per (block, head),
// exactly (up to rounding) the per-query form the reference computes.
// Per KV head: qa [Hk, D] = sum of the group's queries (or of their positive parts for Quest),
// qb [Hk, D] = sum of their negative parts (Quest only).
template <typename RT>
void ScoreT(const RepresentativeStore& reps, int64_t layer, const ScoreArgs& a,
            const std::vector<float>& qa, const std::vector<float>& qb, float* scores,
            ThreadingContext& tc) {
  const int64_t D = a.head_dim, Hk = a.kv_heads, R = reps.rows();
  const bool quest = reps.type() == ReprType::kQuest;
  tc.ParallelFor(static_cast<size_t>(a.n), 64, [&](size_t b, size_t e) HWY_ATTR {
    const hn::ScalableTag<float> df;
    const int64_t L = static_cast<int64_t>(hn::Lanes(df));
    for (size_t bi = b; bi < e; ++bi) {
      const RT* base = static_cast<const RT*>(reps.Block(layer, a.blocks[bi]));
      for (int64_t h = 0; h < Hk; ++h) {
        const RT* r0 = base + h * R * D;
        const float* pa = qa.data() + h * D;
        auto acc = hn::Zero(df);
        int64_t d = 0;
        if (!quest) {
          for (; d + L <= D; d += L)
            acc = hn::MulAdd(hn::LoadU(df, pa + d), LoadF32(df, r0 + d), acc);
        } else {
          const RT* r1 = r0 + D;  // min row
          const float* pb = qb.data() + h * D;
          for (; d + L <= D; d += L) {
            acc = hn::MulAdd(hn::LoadU(df, pa + d), LoadF32(df, r0 + d), acc);
            acc = hn::MulAdd(hn::LoadU(df, pb + d), LoadF32(df, r1 + d), acc);
          }
        }
        float s = ReduceF32(df, acc);
        for (; d < D; ++d) {
          s += pa[d] * ScalarF32(r0[d]);
          if (quest) s += qb[h * D + d] * ScalarF32(r0[D + d]);
        }
        scores[h * a.n + static_cast<int64_t>(bi)] = s;
      }
    }
  });
}

// qa, qb: GroupQueries' of a (a.q unused).
void ScoreGroupedImpl(const RepresentativeStore& reps, int64_t layer, const ScoreArgs& a,
                      const std::vector<float>& qa, const std::vector<float>& qb, float* scores,
                      ThreadingContext& tc) {
  if (reps.storage() == DType::kF32)
    ScoreT<float>(reps, layer, a, qa, qb, scores, tc);
  else
    ScoreT<hwy::bfloat16_t>(reps, layer, a, qa, qb, scores, tc);
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle {
void SumOverHeads(float* sc, int64_t kv_heads, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 1; h < kv_heads; ++h) sc[i] += sc[h * n + i];
}

void GroupQueries(const ScoreArgs& a, bool quest, float* qa, float* qb) {
  const int64_t D = a.head_dim, G = a.heads / a.kv_heads;
  std::fill(qa, qa + a.kv_heads * D, 0.0f);
  std::fill(qb, qb + a.kv_heads * D, 0.0f);
  for (int64_t i = 0; i < a.nq; ++i)
    for (int64_t h = 0; h < a.heads; ++h)
      for (int64_t d = 0; d < D; ++d) {
        const float x = a.q[(i * a.heads + h) * D + d];
        if (!quest) {
          qa[(h / G) * D + d] += x;
        } else {
          qa[(h / G) * D + d] += std::max(x, 0.0f);
          qb[(h / G) * D + d] += std::min(x, 0.0f);
        }
      }
}

HWY_EXPORT(ScoreGroupedImpl);
namespace fast {
void ScoreBlocks(const RepresentativeStore& reps, int64_t layer, const ScoreArgs& a, float* scores,
                 ThreadingContext& tc) {
  const size_t n = static_cast<size_t>(a.kv_heads * a.head_dim);
  std::vector<float> qa(n), qb(n);
  GroupQueries(a, reps.type() == ReprType::kQuest, qa.data(), qb.data());
  HWY_DYNAMIC_DISPATCH(ScoreGroupedImpl)(reps, layer, a, qa, qb, scores, tc);
}
void ScoreGrouped(const RepresentativeStore& reps, int64_t layer, const ScoreArgs& a,
                  const std::vector<float>& qa, const std::vector<float>& qb, float* scores,
                  ThreadingContext& tc) {
  HWY_DYNAMIC_DISPATCH(ScoreGroupedImpl)(reps, layer, a, qa, qb, scores, tc);
}
}  // namespace fast

namespace ref {
void ScoreBlocks(const RepresentativeStore& reps, int64_t layer, const ScoreArgs& a, float* scores,
                 ThreadingContext&) {
  const int64_t D = a.head_dim, G = a.heads / a.kv_heads, R = reps.rows();
  for (int64_t bi = 0; bi < a.n; ++bi) {
    const void* base = reps.Block(layer, a.blocks[bi]);
    for (int64_t h = 0; h < a.kv_heads; ++h) {
      double s = 0;
      for (int64_t i = 0; i < a.nq; ++i)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d) {
            const float qv = a.q[(i * a.heads + h * G + g) * D + d];
            const float mx = LoadAsF32(reps.storage(), base, static_cast<size_t>((h * R) * D + d));
            if (reps.type() == ReprType::kQuest) {
              const float mn =
                  LoadAsF32(reps.storage(), base, static_cast<size_t>((h * R + 1) * D + d));
              s += std::max(qv * mx, qv * mn);
            } else {
              s += qv * mx;
            }
          }
      scores[h * a.n + bi] = static_cast<float>(s);
    }
  }
}
}  // namespace ref
}  // namespace needle
#endif
