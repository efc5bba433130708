// Shared per-target vector code: loading f32, bf16 or f16 memory as f32 vectors. Included from
// inside the foreach_target translation units (toggle guard, as Highway requires).
#if defined(NEEDLE_CPU_LOAD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NEEDLE_CPU_LOAD_INL_H_
#undef NEEDLE_CPU_LOAD_INL_H_
#else
#define NEEDLE_CPU_LOAD_INL_H_
#endif

#include "engine/base/dtype.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace needle {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Lanes(df) elements from p, widened to f32.
template <class DF>
HWY_INLINE hn::Vec<DF> LoadF32(DF df, const float* HWY_RESTRICT p) {
  return hn::LoadU(df, p);
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadF32(DF df, const hwy::bfloat16_t* HWY_RESTRICT p) {
  const hn::Rebind<hwy::bfloat16_t, DF> d16;
  return hn::PromoteTo(df, hn::LoadU(d16, p));
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadF32(DF df, const hwy::float16_t* HWY_RESTRICT p) {
  const hn::Rebind<hwy::float16_t, DF> d16;
  return hn::PromoteTo(df, hn::LoadU(d16, p));
}

HWY_INLINE float ScalarF32(float v) { return v; }
HWY_INLINE float ScalarF32(hwy::bfloat16_t v) { return BF16ToF32(v.bits); }
HWY_INLINE float ScalarF32(hwy::float16_t v) { return F16ToF32(v.bits); }

// Sum of all lanes as a scalar.
template <class DF>
HWY_INLINE float ReduceF32(DF df, hn::Vec<DF> v) {
  return hn::GetLane(hn::SumOfLanes(df, v));
}

}  // namespace HWY_NAMESPACE
}  // namespace needle
HWY_AFTER_NAMESPACE();

#endif  // NEEDLE_CPU_LOAD_INL_H_
