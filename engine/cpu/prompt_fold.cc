// The Highway row tile (prompt_groups.h): a prompt's query rows in vector lanes. A group's rows
// (R tokens x G heads, padded to whole vectors) fold a piece of keys as two small products,
// with every operand read from the caches and the rows' softmax state in vectors:
//   S^T [n][M]  = K [n][D] . Q^T [D][M]        a key channel broadcast, a vector of rows
//   m, l [M]      the online softmax, lane by lane: P^T [n][M] = exp(S^T - m)
//   O^T [D][M]  = O^T * corr + V^T [D][n] . P^T [n][M]   a value channel broadcast
// Each broadcast operand comes from memory, so the inner loops are fused multiply-adds and
// loads only: no per-row reductions, and a piece's keys and values are widened to f32 once for
// all M rows. The partials go in and out of the lanes once per group (Load, Store).
#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/attention/partial.h"
#include "engine/base/error.h"
#include "engine/cpu/ops.h"
#include "engine/cpu/prompt_groups.h"
#include "engine/cpu/with_size.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/prompt_fold.cc"
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

constexpr int64_t kPieceKeys = 128;  // keys widened and folded at a time: [128 i, 128 (i + 1))
constexpr int kKeyTile = 4;          // keys x row vectors in registers: 4 x 4 accumulators
constexpr int kRowTile = 4;
constexpr int kChanTile = 4;  // value channels x row vectors: 4 x 4

class RowTile : public RowFolder {
 public:
  void Load(const PartialAttention* parts, int64_t n) override {
    s_.Load(parts, n, static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>())));
    Shape();
  }
  void SetQueries(const float* rows, int64_t n, int64_t D, float scale) override {
    NEEDLE_CHECK(n == s_.n && D == s_.D);
    for (int64_t d = 0; d < D; ++d) {
      float* col = qt_.data() + d * s_.M;
      for (int64_t r = 0; r < n; ++r) col[r] = rows[r * D + d] * scale;
      std::fill(col + n, col + s_.M, 0.f);  // (padding rows score 0: finite, and never stored)
    }
  }
  void Fold(const KVLayerView& kv, int64_t h, int64_t k0, int64_t k1) override {
    NEEDLE_CHECK(kv.head_dim == s_.D);
    for (int64_t b = k0; b < k1;) {
      const int64_t n = std::min(k1, (b / kPieceKeys + 1) * kPieceKeys) - b;
      KVRowsToF32InTarget(kv, false, h, b, b + n, kf_.data());
      KVRowsToF32InTarget(kv, true, h, b, b + n, vf_.data());
      FoldPiece(n);
      b += n;
    }
  }
  int64_t Grid(const KVLayerView&) const override { return kPieceKeys; }
  void Store(PartialAttention* parts, int64_t n) override { s_.Store(parts, n); }

 private:
  // The scratch sized for the loaded rows.
  void Shape() {
    const size_t M = static_cast<size_t>(s_.M), D = static_cast<size_t>(s_.D);
    qt_.resize(D * M), st_.resize(static_cast<size_t>(kPieceKeys) * M);
    kf_.resize(static_cast<size_t>(kPieceKeys) * D);
    vf_.resize(static_cast<size_t>(kPieceKeys) * D);
  }

  // S^T rows [j0, j0 + KJ) x row vectors [v0, v0 + RV): sum over the channels of a key channel
  // (broadcast) times the rows' query channel.
  template <int KJ, int RV>
  HWY_INLINE void ScoreTile(int64_t j0, int64_t v0) {
    const hn::ScalableTag<float> df;
    const int64_t L = static_cast<int64_t>(hn::Lanes(df));
    hn::Vec<decltype(df)> acc[KJ][RV];
    for (int j = 0; j < KJ; ++j)
      for (int v = 0; v < RV; ++v) acc[j][v] = hn::Zero(df);
    const float* HWY_RESTRICT k = kf_.data() + j0 * s_.D;
    const float* HWY_RESTRICT q = qt_.data() + v0 * L;
    for (int64_t d = 0; d < s_.D; ++d) {
      hn::Vec<decltype(df)> qv[RV];
      for (int v = 0; v < RV; ++v) qv[v] = hn::LoadU(df, q + d * s_.M + v * L);
      for (int j = 0; j < KJ; ++j) {
        const auto kb = hn::Set(df, k[j * s_.D + d]);
        for (int v = 0; v < RV; ++v) acc[j][v] = hn::MulAdd(kb, qv[v], acc[j][v]);
      }
    }
    for (int j = 0; j < KJ; ++j)
      for (int v = 0; v < RV; ++v)
        hn::StoreU(acc[j][v], df, st_.data() + (j0 + j) * s_.M + (v0 + v) * L);
  }

  // O^T channels [d0, d0 + KD) x row vectors [v0, v0 + RV): rescaled by corr, plus the piece's
  // probabilities times a value channel (broadcast).
  template <int KD, int RV>
  HWY_INLINE void ValueTile(int64_t n, int64_t d0, int64_t v0) {
    const hn::ScalableTag<float> df;
    const int64_t L = static_cast<int64_t>(hn::Lanes(df));
    hn::Vec<decltype(df)> acc[KD][RV];
    for (int c = 0; c < KD; ++c)
      for (int v = 0; v < RV; ++v)
        acc[c][v] = hn::Mul(hn::LoadU(df, s_.ot.data() + (d0 + c) * s_.M + (v0 + v) * L),
                            hn::LoadU(df, s_.corr.data() + (v0 + v) * L));
    const float* HWY_RESTRICT val = vf_.data() + d0;
    const float* HWY_RESTRICT p = st_.data() + v0 * L;
    for (int64_t j = 0; j < n; ++j) {
      hn::Vec<decltype(df)> pv[RV];
      for (int v = 0; v < RV; ++v) pv[v] = hn::LoadU(df, p + j * s_.M + v * L);
      for (int c = 0; c < KD; ++c) {
        const auto vb = hn::Set(df, val[j * s_.D + c]);
        for (int v = 0; v < RV; ++v) acc[c][v] = hn::MulAdd(vb, pv[v], acc[c][v]);
      }
    }
    for (int c = 0; c < KD; ++c)
      for (int v = 0; v < RV; ++v)
        hn::StoreU(acc[c][v], df, s_.ot.data() + (d0 + c) * s_.M + (v0 + v) * L);
  }

  // Folds the n keys and values in kf_, vf_ into every row.
  void FoldPiece(int64_t n) {
    const hn::ScalableTag<float> df;
    const int64_t L = static_cast<int64_t>(hn::Lanes(df)), V = s_.M / L;
    // Scores.
    for (int64_t v0 = 0; v0 < V; v0 += kRowTile) {
      const int64_t rv = std::min<int64_t>(kRowTile, V - v0);
      for (int64_t j0 = 0; j0 < n; j0 += kKeyTile)
        WithSize<kKeyTile>(n - j0, [&](auto kj) HWY_ATTR {
          WithSize<kRowTile>(rv, [&](auto r) HWY_ATTR {
            ScoreTile<decltype(kj)::value, decltype(r)::value>(j0, v0);
          });
        });
    }
    // Online softmax, lane by lane: the new maximum, the old state's factor, the probabilities.
    s_.corr.resize(static_cast<size_t>(s_.M));
    for (int64_t v = 0; v < V; ++v) {
      float* HWY_RESTRICT s = st_.data() + v * L;
      const auto m_old = hn::LoadU(df, s_.m.data() + v * L);
      auto mx = m_old;
      for (int64_t j = 0; j < n; ++j) mx = hn::Max(mx, hn::LoadU(df, s + j * s_.M));
      // (an empty row's maximum is -inf: its factor is 0, and exp is not asked for -inf)
      const auto empty = hn::Eq(m_old, hn::Set(df, -INFINITY));
      const auto corr =
          hn::IfThenZeroElse(empty, hn::Exp(df, hn::Sub(hn::IfThenElse(empty, mx, m_old), mx)));
      auto sum = hn::Zero(df);
      for (int64_t j = 0; j < n; ++j) {
        const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + j * s_.M), mx));
        hn::StoreU(e, df, s + j * s_.M);
        sum = hn::Add(sum, e);
      }
      hn::StoreU(hn::MulAdd(hn::LoadU(df, s_.l.data() + v * L), corr, sum), df,
                 s_.l.data() + v * L);
      hn::StoreU(mx, df, s_.m.data() + v * L);
      hn::StoreU(corr, df, s_.corr.data() + v * L);
    }
    for (int64_t r = 0; r < s_.M; ++r) s_.count[r] += n;
    // Values.
    for (int64_t v0 = 0; v0 < V; v0 += kRowTile) {
      const int64_t rv = std::min<int64_t>(kRowTile, V - v0);
      for (int64_t d0 = 0; d0 < s_.D; d0 += kChanTile)
        WithSize<kChanTile>(s_.D - d0, [&](auto kd) HWY_ATTR {
          WithSize<kRowTile>(rv, [&](auto r) HWY_ATTR {
            ValueTile<decltype(kd)::value, decltype(r)::value>(n, d0, v0);
          });
        });
    }
  }

  LaneRows s_;                  // the rows' softmax state and outputs, in lanes
  std::vector<float> qt_;       // Q^T (scaled) [D][M]
  std::vector<float> st_;       // S^T, then P^T [kPieceKeys][M]
  std::vector<float> kf_, vf_;  // the piece's keys and values as f32 [kPieceKeys][D]
};

RowFolder& ThreadRowTile() {
  thread_local RowTile f;
  return f;
}

void FoldPromptRowsImpl(const float* q, const KVLayerView& kv, const AttnArgs& a,
                        const AttnSpans* spans, PartialAttention* parts, ThreadingContext& tc) {
  const int64_t L = static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>()));
  const int64_t G = a.heads / a.kv_heads;
  // Four vectors of rows a group (the register tile's height).
  FoldPromptGroups(std::max<int64_t>(1, kRowTile * L / G), &ThreadRowTile, q, kv, a, spans, parts,
                   tc);
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle {
HWY_EXPORT(FoldPromptRowsImpl);
namespace fast {
void FoldPromptRows(const float* q, const KVLayerView& kv, const AttnArgs& a,
                    const AttnSpans* spans, PartialAttention* parts, ThreadingContext& tc) {
  HWY_DYNAMIC_DISPATCH(FoldPromptRowsImpl)(q, kv, a, spans, parts, tc);
}
}  // namespace fast
}  // namespace needle
#endif
