// AVX-512 helpers shared by the intrinsics folders (amx.cc, bf16_prompt.cc), which are compiled
// without ISA flags: each function carries its target attribute, and runs only after the CPU
// check said yes.
#pragma once

#include <immintrin.h>

namespace needle::avx512 {

// Whether this CPU has AVX-512 F, BW, VL, DQ and BF16 (the vdpbf16ps dot products) and the OS
// saves the AVX-512 state. Asked once per process.
bool HasBf16();

// e^x for x <= 0 (clamped at -87), relative error ~2e-7.
__attribute__((target("avx512f"))) inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945f));
  // e^f on |f| <= ln2/2: Taylor to degree 7.
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace needle::avx512
