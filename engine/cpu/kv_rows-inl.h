// Shared per-target vector code: KV cache rows (f32, bf16, f16 or int8 with per-group scales) to
// f32, for the kernels that read the cache row by row (engine/cpu/attention.cc,
// sparse_attn/block_mass.cc). Included from inside the foreach_target translation units (toggle
// guard, as Highway requires).
#if defined(NEEDLE_CPU_KV_ROWS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NEEDLE_CPU_KV_ROWS_INL_H_
#undef NEEDLE_CPU_KV_ROWS_INL_H_
#else
#define NEEDLE_CPU_KV_ROWS_INL_H_
#endif

#include <algorithm>

#include "engine/cpu/load-inl.h"
#include "hwy/highway.h"
#include "kvcache/kv_cache.h"

HWY_BEFORE_NAMESPACE();
namespace needle {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// n consecutive rows of D elements (one block piece) to f32: dst [n, D].
template <typename ST>
HWY_INLINE void RowsToF32(const ST* HWY_RESTRICT src, int64_t n, int64_t D,
                          float* HWY_RESTRICT dst) {
  const hn::ScalableTag<float> df;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  const int64_t total = n * D;
  int64_t i = 0;
  for (; i + L <= total; i += L) hn::StoreU(LoadF32(df, src + i), df, dst + i);
  for (; i < total; ++i) dst[i] = ScalarF32(src[i]);
}

// int8 rows with one scale per kKVGroup channels of each row: scales [n, groups].
HWY_INLINE void RowsToF32(const int8_t* HWY_RESTRICT src, const float* HWY_RESTRICT scales,
                          int64_t n, int64_t D, int64_t groups, float* HWY_RESTRICT dst) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<int32_t, decltype(df)> di;
  const hn::Rebind<int8_t, decltype(df)> d8;
  const int64_t L = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* row = src + r * D;
    float* out = dst + r * D;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * kKVGroup, c1 = std::min(D, c0 + kKVGroup);
      const float sc = scales[r * groups + g];
      const auto vs = hn::Set(df, sc);
      int64_t c = c0;
      for (; c + L <= c1; c += L)
        hn::StoreU(hn::Mul(hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, row + c))), vs), df,
                   out + c);
      for (; c < c1; ++c) out[c] = static_cast<float>(row[c]) * sc;
    }
  }
}

// Rows [b, e) of KV head h (K, or V when `values`) to f32: dst [e - b, head_dim]. The rows may
// span several blocks.
HWY_INLINE void KVRowsToF32InTarget(const KVLayerView& kv, bool values, int64_t h, int64_t b,
                                    int64_t e, float* HWY_RESTRICT dst) {
  const int64_t B = kv.block_size, D = kv.head_dim;
  while (b < e) {
    const int64_t n = std::min(e, (b / B + 1) * B) - b;
    const uint8_t* row = values ? kv.VRow(h, b) : kv.KRow(h, b);
    switch (kv.dtype) {
      case DType::kF32:
        std::copy_n(reinterpret_cast<const float*>(row), n * D, dst);
        break;
      case DType::kBF16:
        RowsToF32(reinterpret_cast<const hwy::bfloat16_t*>(row), n, D, dst);
        break;
      case DType::kF16:
        RowsToF32(reinterpret_cast<const hwy::float16_t*>(row), n, D, dst);
        break;
      default:
        RowsToF32(reinterpret_cast<const int8_t*>(row), values ? kv.VScale(h, b) : kv.KScale(h, b),
                  n, D, kv.groups, dst);
    }
    dst += n * D;
    b += n;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#endif  // NEEDLE_CPU_KV_ROWS_INL_H_
