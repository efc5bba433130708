// Row-wise and element-wise operators: RMSNorm, RoPE, SwiGLU's silu(gate) * up, residual add.
// All memory-bound; parallel over rows (or large element ranges), SIMD within a row.
#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/cpu/ops.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/elementwise.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

// Per-target code shared between op families (after highway.h, as Highway requires).
#include "engine/cpu/load-inl.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace needle {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr size_t kElemGrain = 1 << 14;

template <typename WT>
void RmsNormT(const float* x, int64_t rows, int64_t D, const WT* w, float eps, float* y,
              ThreadingContext& tc) {
  tc.ParallelFor(static_cast<size_t>(rows), std::max<size_t>(1, 4096 / std::max<int64_t>(D, 1)),
                 [&](size_t b, size_t e) HWY_ATTR {
                   const hn::ScalableTag<float> df;
                   const int64_t L = static_cast<int64_t>(hn::Lanes(df));
                   for (size_t r = b; r < e; ++r) {
                     const float* xr = x + r * D;
                     float* yr = y + r * D;
                     auto acc = hn::Zero(df);
                     int64_t i = 0;
                     for (; i + L <= D; i += L) {
                       const auto v = hn::LoadU(df, xr + i);
                       acc = hn::MulAdd(v, v, acc);
                     }
                     float ss = ReduceF32(df, acc);
                     for (int64_t k = i; k < D; ++k) ss += xr[k] * xr[k];
                     const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
                     const auto vinv = hn::Set(df, inv);
                     i = 0;
                     for (; i + L <= D; i += L)
                       hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(df, xr + i), vinv), LoadF32(df, w + i)),
                                  df, yr + i);
                     for (; i < D; ++i) yr[i] = (xr[i] * inv) * ScalarF32(w[i]);
                   }
                 });
}

void RmsNormImpl(const float* x, int64_t rows, int64_t D, const Weight& w, float eps, float* y,
                 ThreadingContext& tc) {
  switch (w.dtype) {
    case DType::kBF16:
      RmsNormT(x, rows, D, static_cast<const hwy::bfloat16_t*>(w.data), eps, y, tc);
      break;
    case DType::kF16:
      RmsNormT(x, rows, D, static_cast<const hwy::float16_t*>(w.data), eps, y, tc);
      break;
    default:
      RmsNormT(x, rows, D, static_cast<const float*>(w.data), eps, y, tc);
      break;
  }
}

void RopeImpl(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0, const float* inv_freq,
              float scaling, ThreadingContext& tc) {
  const int64_t half = D / 2;
  std::vector<float> cs(T * half), sn(T * half);
  RopeTable(T, D, pos0, inv_freq, scaling, cs.data(), sn.data());
  tc.ParallelFor(static_cast<size_t>(T * heads), 16, [&](size_t b, size_t e) HWY_ATTR {
    const hn::ScalableTag<float> df;
    const int64_t L = static_cast<int64_t>(hn::Lanes(df));
    for (size_t row = b; row < e; ++row) {
      const int64_t t = static_cast<int64_t>(row) / heads;
      float* v = x + row * D;
      const float* c = cs.data() + t * half;
      const float* s = sn.data() + t * half;
      int64_t i = 0;
      for (; i + L <= half; i += L) {
        const auto a = hn::LoadU(df, v + i), bb = hn::LoadU(df, v + i + half);
        const auto co = hn::LoadU(df, c + i), si = hn::LoadU(df, s + i);
        hn::StoreU(hn::Sub(hn::Mul(a, co), hn::Mul(bb, si)), df, v + i);
        hn::StoreU(hn::Add(hn::Mul(bb, co), hn::Mul(a, si)), df, v + i + half);
      }
      for (; i < half; ++i) {
        const float a = v[i], bb = v[i + half];
        v[i] = a * c[i] - bb * s[i];
        v[i + half] = bb * c[i] + a * s[i];
      }
    }
  });
}

void SiluMulImpl(const float* gate, const float* up, int64_t n, float* out, ThreadingContext& tc) {
  tc.ParallelFor(static_cast<size_t>(n), kElemGrain, [&](size_t b, size_t e) HWY_ATTR {
    const hn::ScalableTag<float> df;
    const size_t L = hn::Lanes(df);
    const auto one = hn::Set(df, 1.0f);
    size_t i = b;
    for (; i + L <= e; i += L) {
      const auto g = hn::LoadU(df, gate + i);
      const auto sig = hn::Div(one, hn::Add(one, hn::Exp(df, hn::Neg(g))));
      hn::StoreU(hn::Mul(hn::Mul(g, sig), hn::LoadU(df, up + i)), df, out + i);
    }
    for (; i < e; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  });
}

void AddImpl(float* x, const float* y, int64_t n, ThreadingContext& tc) {
  tc.ParallelFor(static_cast<size_t>(n), kElemGrain, [&](size_t b, size_t e) HWY_ATTR {
    const hn::ScalableTag<float> df;
    const size_t L = hn::Lanes(df);
    size_t i = b;
    for (; i + L <= e; i += L)
      hn::StoreU(hn::Add(hn::LoadU(df, x + i), hn::LoadU(df, y + i)), df, x + i);
    for (; i < e; ++i) x[i] += y[i];
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace needle {
HWY_EXPORT(RmsNormImpl);
HWY_EXPORT(RopeImpl);
HWY_EXPORT(SiluMulImpl);
HWY_EXPORT(AddImpl);
namespace fast {
void RmsNorm(const float* x, int64_t rows, int64_t D, const Weight& w, float eps, float* y,
             ThreadingContext& tc) {
  HWY_DYNAMIC_DISPATCH(RmsNormImpl)(x, rows, D, w, eps, y, tc);
}
void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0, const float* inv_freq,
          float scaling, ThreadingContext& tc) {
  HWY_DYNAMIC_DISPATCH(RopeImpl)(x, T, heads, D, pos0, inv_freq, scaling, tc);
}
void SiluMul(const float* gate, const float* up, int64_t n, float* out, ThreadingContext& tc) {
  HWY_DYNAMIC_DISPATCH(SiluMulImpl)(gate, up, n, out, tc);
}
void Add(float* x, const float* y, int64_t n, ThreadingContext& tc) {
  HWY_DYNAMIC_DISPATCH(AddImpl)(x, y, n, tc);
}
}  // namespace fast
}  // namespace needle
#endif
