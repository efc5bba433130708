#include "sparse_attn/block_mass.h"

#include <algorithm>
#include <cmath>

#include "engine/base/error.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "sparse_attn/block_mass.cc"
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

// q . k for one f32 key row of D elements (unscaled).
HWY_INLINE float RowDot(const float* HWY_RESTRICT q, const float* HWY_RESTRICT k, int64_t D) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  auto acc = hn::Zero(df);
  int64_t d = 0;
  for (; d + L <= D; d += L) acc = hn::MulAdd(hn::LoadU(df, q + d), hn::LoadU(df, k + d), acc);
  float s = ReduceF32(df, acc);
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

// Items (KV head, block) in parallel; each block's rows are converted to f32 once for the G heads.
void BlockMassImpl(const KVLayerView& kv, const BlockMassArgs& a,
                   std::vector<std::vector<float>>* mass, ThreadingContext& tc) {
  const int64_t Hk = a.kv_heads, G = a.heads / Hk, D = a.head_dim, B = kv.block_size;
  const auto& blocks = *a.blocks;
  std::vector<std::pair<int32_t, int32_t>> items;             // (h, i)
  std::vector<int64_t> base(static_cast<size_t>(Hk) + 1, 0);  // first item of head h
  for (int64_t h = 0; h < Hk; ++h) {
    for (size_t i = 0; i < blocks[h].size(); ++i)
      items.emplace_back(static_cast<int32_t>(h), static_cast<int32_t>(i));
    base[h + 1] = static_cast<int64_t>(items.size());
  }
  tc.ParallelFor(items.size(), 4, [&](size_t b, size_t e) HWY_ATTR {
    const hn::ScalableTag<float> df;
    const int64_t L = static_cast<int64_t>(hn::Lanes(df));
    std::vector<float> s(static_cast<size_t>(B)), k(static_cast<size_t>(B * D));  // [B], [B, D]
    for (size_t it = b; it < e; ++it) {
      const int64_t h = items[it].first, i = items[it].second;
      const int64_t t0 = int64_t{blocks[h][i]} * B, t1 = std::min(t0 + B, kv.n_tokens);
      KVRowsToF32InTarget(kv, false, h, t0, t1, k.data());
      double m = 0.0;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = a.q_per_block != nullptr ? a.q_per_block + ((base[h] + i) * G + g) * D
                                                   : a.q + (h * G + g) * D;
        for (int64_t j = 0; j < t1 - t0; ++j) s[j] = RowDot(qg, k.data() + j * D, D);
        const auto vs = hn::Set(df, a.scale), vl = hn::Set(df, a.lse[h * G + g]);
        auto acc = hn::Zero(df);
        int64_t j = 0;
        for (; j + L <= t1 - t0; j += L)
          acc = hn::Add(acc, hn::Exp(df, hn::MulSub(hn::LoadU(df, s.data() + j), vs, vl)));
        float t = ReduceF32(df, acc);
        for (; j < t1 - t0; ++j) t += std::exp(s[j] * a.scale - a.lse[h * G + g]);
        m += t;
      }
      (*mass)[h][i] = static_cast<float>(m);
    }
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle {
namespace {
void Shape(const BlockMassArgs& a, std::vector<std::vector<float>>* mass) {
  NEEDLE_CHECK(a.kv_heads > 0 && a.heads % a.kv_heads == 0);
  NEEDLE_CHECK(static_cast<int64_t>(a.blocks->size()) == a.kv_heads);
  mass->resize(static_cast<size_t>(a.kv_heads));
  for (int64_t h = 0; h < a.kv_heads; ++h) (*mass)[h].assign((*a.blocks)[h].size(), 0.0f);
}
}  // namespace

HWY_EXPORT(BlockMassImpl);
namespace fast {
void BlockMass(const KVLayerView& kv, const BlockMassArgs& a, std::vector<std::vector<float>>* mass,
               ThreadingContext& tc) {
  Shape(a, mass);
  HWY_DYNAMIC_DISPATCH(BlockMassImpl)(kv, a, mass, tc);
}
}  // namespace fast

namespace ref {
void BlockMass(const KVLayerView& kv, const BlockMassArgs& a, std::vector<std::vector<float>>* mass,
               ThreadingContext&) {
  Shape(a, mass);
  const int64_t G = a.heads / a.kv_heads, D = a.head_dim, B = kv.block_size;
  int64_t item = 0;  // (h, i) in order: q_per_block's index
  for (int64_t h = 0; h < a.kv_heads; ++h)
    for (size_t i = 0; i < (*a.blocks)[h].size(); ++i, ++item) {
      const float* q0 = a.q_per_block != nullptr ? a.q_per_block + item * G * D : a.q + h * G * D;
      const int64_t t0 = int64_t{(*a.blocks)[h][i]} * B, t1 = std::min(t0 + B, kv.n_tokens);
      double m = 0.0;
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* row = kv.KRow(h, t);
        const float* sc = kv.KScale(h, t);
        for (int64_t g = 0; g < G; ++g) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            const float k =
                kv.dtype == DType::kI8
                    ? static_cast<float>(reinterpret_cast<const int8_t*>(row)[d]) * sc[d / kKVGroup]
                    : LoadAsF32(kv.dtype, row, static_cast<size_t>(d));
            dot += static_cast<double>(q0[g * D + d]) * k;
          }
          m += std::exp(dot * a.scale - a.lse[h * G + g]);
        }
      }
      (*mass)[h][i] = static_cast<float>(m);
    }
}
}  // namespace ref
}  // namespace needle
#endif
