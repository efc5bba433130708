// The AVX512-BF16 prompt fold (bf16dot.h). Compiled without ISA flags: the functions that
// use AVX-512 carry their target attribute and run only after avx512::HasBf16() said yes.
#include "engine/cpu/bf16dot.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "engine/base/dtype.h"
#include "engine/base/error.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/avx512.h"
#include "engine/cpu/prompt_groups.h"
#include "engine/cpu/with_size.h"

namespace needle::bf16dot {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kPieceKeys = 128;  // keys folded at a time: [128 i, 128 (i + 1))
constexpr int kKeyTile = 4;          // keys x row vectors in registers: 4 x 4 accumulators
constexpr int kRowTile = 4;
constexpr int kChanTile = 4;  // value channels x row vectors: 4 x 4

std::atomic<int> g_mode{static_cast<int>(Mode::kFromEnv)};

class Bf16Rows : public RowFolder {
 public:
  void Load(const PartialAttention* parts, int64_t n) override {
    s_.Load(parts, n, kLanes);
    Shape();
  }
  void SetQueries(const float* rows, int64_t n, int64_t D, float scale) override {
    NEEDLE_CHECK(n == s_.n && D == s_.D);
    for (int64_t i = 0; i < D / 2; ++i) {
      uint32_t* col = qp_.data() + i * s_.M;
      for (int64_t r = 0; r < n; ++r)
        col[r] = BF16Pair(rows[r * D + 2 * i] * scale, rows[r * D + 2 * i + 1] * scale);
      std::fill(col + n, col + s_.M, 0u);  // (padding rows score 0: finite, and never stored)
    }
  }
  int64_t Grid(const KVLayerView&) const override { return kPieceKeys; }
  void Fold(const KVLayerView& kv, int64_t h, int64_t k0, int64_t k1) override {
    NEEDLE_CHECK(kv.head_dim == s_.D && kv.dtype == DType::kBF16);
    for (int64_t b = k0; b < k1;) {
      const int64_t n = std::min(k1, (b / kPieceKeys + 1) * kPieceKeys) - b;
      for (int64_t j = 0; j < n; ++j)
        krow_[j] = reinterpret_cast<const uint16_t*>(kv.KRow(h, b + j));
      for (int64_t j = 0; j < n; j += 2)
        avx512::InterleaveRows(
            reinterpret_cast<const uint16_t*>(kv.VRow(h, b + j)),
            j + 1 < n ? reinterpret_cast<const uint16_t*>(kv.VRow(h, b + j + 1)) : nullptr, s_.D,
            vp_.data() + (j / 2) * s_.D);
      FoldPiece(n);
      b += n;
    }
  }
  void Store(PartialAttention* parts, int64_t n) override { s_.Store(parts, n); }

 private:
  // The scratch sized for the loaded rows.
  void Shape() {
    NEEDLE_CHECK(s_.D % 2 == 0);
    const size_t M = static_cast<size_t>(s_.M), D = static_cast<size_t>(s_.D);
    qp_.resize(D / 2 * M), st_.resize(static_cast<size_t>(kPieceKeys) * M);
    pp_.resize(static_cast<size_t>(kPieceKeys / 2) * M);
    vp_.resize(static_cast<size_t>(kPieceKeys / 2) * D), krow_.resize(kPieceKeys);
  }

  // S^T rows [j0, j0 + KJ) x row vectors [v0, v0 + RV).
  template <int KJ, int RV>
  NEEDLE_BF16_TARGET void ScoreTile(int64_t j0, int64_t v0) {
    __m512 acc[KJ][RV];
    for (int j = 0; j < KJ; ++j)
      for (int v = 0; v < RV; ++v) acc[j][v] = _mm512_setzero_ps();
    const uint32_t* q = qp_.data() + v0 * kLanes;
    for (int64_t i = 0; i < s_.D / 2; ++i) {
      __m512bh qv[RV];
      for (int v = 0; v < RV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(q + i * s_.M + v * kLanes);
      for (int j = 0; j < KJ; ++j) {
        int32_t pair;
        std::memcpy(&pair, krow_[j0 + j] + 2 * i, 4);
        const __m512bh kb = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < RV; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], qv[v], kb);
      }
    }
    for (int j = 0; j < KJ; ++j)
      for (int v = 0; v < RV; ++v)
        _mm512_storeu_ps(st_.data() + (j0 + j) * s_.M + (v0 + v) * kLanes, acc[j][v]);
  }

  // O^T channels [d0, d0 + KD) x row vectors [v0, v0 + RV): rescaled, plus np pairs of keys.
  template <int KD, int RV>
  NEEDLE_BF16_TARGET void ValueTile(int64_t np, int64_t d0, int64_t v0) {
    __m512 acc[KD][RV];
    for (int c = 0; c < KD; ++c)
      for (int v = 0; v < RV; ++v)
        acc[c][v] =
            _mm512_mul_ps(_mm512_loadu_ps(s_.ot.data() + (d0 + c) * s_.M + (v0 + v) * kLanes),
                          _mm512_loadu_ps(s_.corr.data() + (v0 + v) * kLanes));
    for (int64_t jp = 0; jp < np; ++jp) {
      __m512bh pv[RV];
      for (int v = 0; v < RV; ++v)
        pv[v] = (__m512bh)_mm512_loadu_si512(pp_.data() + jp * s_.M + (v0 + v) * kLanes);
      for (int c = 0; c < KD; ++c) {
        const __m512bh vb =
            (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(vp_[jp * s_.D + d0 + c]));
        for (int v = 0; v < RV; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], pv[v], vb);
      }
    }
    for (int c = 0; c < KD; ++c)
      for (int v = 0; v < RV; ++v)
        _mm512_storeu_ps(s_.ot.data() + (d0 + c) * s_.M + (v0 + v) * kLanes, acc[c][v]);
  }

  // Folds the n keys of krow_ and the values of vp_ into every row.
  NEEDLE_BF16_TARGET void FoldPiece(int64_t n) {
    const int64_t V = s_.M / kLanes, np = (n + 1) / 2;
    for (int64_t v0 = 0; v0 < V; v0 += kRowTile) {
      const int64_t rv = std::min<int64_t>(kRowTile, V - v0);
      for (int64_t j0 = 0; j0 < n; j0 += kKeyTile)
        WithSize<kKeyTile>(n - j0, [&](auto kj) NEEDLE_BF16_TARGET {
          WithSize<kRowTile>(rv, [&](auto r) NEEDLE_BF16_TARGET {
            ScoreTile<decltype(kj)::value, decltype(r)::value>(j0, v0);
          });
        });
    }
    // Online softmax, lane by lane; the probabilities rounded to bf16 in pairs of keys, and the
    // sum l of the rounded ones.
    for (int64_t v = 0; v < V; ++v) {
      const float* s = st_.data() + v * kLanes;
      const __m512 m_old = _mm512_loadu_ps(s_.m.data() + v * kLanes);
      __m512 mx = m_old;
      for (int64_t j = 0; j < n; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j * s_.M));
      const __mmask16 empty = _mm512_cmp_ps_mask(m_old, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
      const __m512 corr =
          _mm512_mask_mov_ps(avx512::Exp(_mm512_sub_ps(_mm512_mask_mov_ps(m_old, empty, mx), mx)),
                             empty, _mm512_setzero_ps());
      __m512 sum = _mm512_setzero_ps();
      for (int64_t jp = 0; jp < np; ++jp) {
        const int64_t j = 2 * jp;
        const __m512 e0 = avx512::Exp(_mm512_sub_ps(_mm512_loadu_ps(s + j * s_.M), mx));
        const __m512 e1 = j + 1 < n
                              ? avx512::Exp(_mm512_sub_ps(_mm512_loadu_ps(s + (j + 1) * s_.M), mx))
                              : _mm512_setzero_ps();
        const __m512i b0 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e0));
        const __m512i b1 =
            _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e1)), 16);
        _mm512_storeu_si512(pp_.data() + jp * s_.M + v * kLanes, _mm512_or_si512(b0, b1));
        sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b0, 16)),
                                               _mm512_castsi512_ps(b1)));
      }
      _mm512_storeu_ps(s_.l.data() + v * kLanes,
                       _mm512_fmadd_ps(_mm512_loadu_ps(s_.l.data() + v * kLanes), corr, sum));
      _mm512_storeu_ps(s_.m.data() + v * kLanes, mx);
      _mm512_storeu_ps(s_.corr.data() + v * kLanes, corr);
    }
    for (int64_t r = 0; r < s_.M; ++r) s_.count[r] += n;
    for (int64_t v0 = 0; v0 < V; v0 += kRowTile) {
      const int64_t rv = std::min<int64_t>(kRowTile, V - v0);
      for (int64_t d0 = 0; d0 < s_.D; d0 += kChanTile)
        WithSize<kChanTile>(s_.D - d0, [&](auto kd) NEEDLE_BF16_TARGET {
          WithSize<kRowTile>(rv, [&](auto r) NEEDLE_BF16_TARGET {
            ValueTile<decltype(kd)::value, decltype(r)::value>(np, d0, v0);
          });
        });
    }
  }

  LaneRows s_;                         // the rows' softmax state and outputs, in lanes
  std::vector<uint32_t> qp_;           // Q^T as bf16 pairs of channels [D / 2][M], scaled
  std::vector<float> st_;              // S^T [kPieceKeys][M]
  std::vector<uint32_t> pp_;           // P^T as bf16 pairs of keys [kPieceKeys / 2][M]
  std::vector<uint32_t> vp_;           // values as bf16 pairs of keys [kPieceKeys / 2][D]
  std::vector<const uint16_t*> krow_;  // the piece's key rows
};

RowFolder& ThreadRows() {
  thread_local Bf16Rows f;
  return f;
}

}  // namespace

void SetMode(Mode m) { g_mode.store(static_cast<int>(m)); }

bool Use(int64_t D) {
  static const Mode env = [] {
    const char* e = std::getenv("NEEDLE_CPU_BF16DOT");
    if (e != nullptr && std::strcmp(e, "0") == 0) return Mode::kOff;
    if (e != nullptr && std::strcmp(e, "1") == 0) return Mode::kOn;
    return Mode::kAuto;
  }();
  Mode m = static_cast<Mode>(g_mode.load(std::memory_order_relaxed));
  if (m == Mode::kFromEnv) m = env;
  if (m == Mode::kOff || D < 2 || D % 2 != 0 || !avx512::HasBf16()) return false;
  return m == Mode::kOn || !amx::Supported();
}

void FoldPrompt(const float* q, const KVLayerView& kv, const AttnArgs& a, const AttnSpans* spans,
                PartialAttention* parts, ThreadingContext& tc) {
  NEEDLE_CHECK(kv.dtype == DType::kBF16 && Use(a.head_dim));
  const int64_t G = a.heads / a.kv_heads;
  FoldPromptGroups(std::max<int64_t>(1, kRowTile * kLanes / G), &ThreadRows, q, kv, a, spans, parts,
                   tc);
}

}  // namespace needle::bf16dot
