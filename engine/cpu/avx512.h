// AVX-512 helpers shared by the intrinsics folders (amx.cc, bf16_prompt.cc, bf16_blocks.cc), which
// are compiled without ISA flags: each function carries its target attribute, and runs only after
// the CPU check said yes.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*, which its flow analysis reports as
// uninitialised once inlined into the files that include this one (only the intrinsics folders).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// The target of the AVX512-BF16 folds' functions (bf16_prompt.cc, bf16_blocks.cc).
#define NEEDLE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

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

// Lanes [0, left) of a vector of 16 (left may be <= 0 or >= 16).
inline __mmask16 Live(int64_t left) {
  return left >= 16 ? 0xffff : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// The largest of s[0, n) (-inf for n = 0).
__attribute__((target("avx512f"))) inline float MaxOf(const float* s, int64_t n) {
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16)
    vm = _mm512_mask_max_ps(vm, Live(n - j), vm, _mm512_loadu_ps(s + j));
  return _mm512_reduce_max_ps(vm);
}

// out [D] = bf16 pairs (a_d, b_d) of two rows of D bf16 (b null: zeros), 32 channels a
// permutation.
__attribute__((target("avx512f,avx512bw"))) inline void InterleaveRows(const uint16_t* a,
                                                                       const uint16_t* b, int64_t D,
                                                                       uint32_t* out) {
  alignas(64) static const uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                               37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                               11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                               53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                               27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    const __m512i va = _mm512_loadu_si512(a + d);
    const __m512i vb = b != nullptr ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + d, _mm512_permutex2var_epi16(va, lo, vb));
    _mm512_storeu_si512(out + d + 16, _mm512_permutex2var_epi16(va, hi, vb));
  }
  for (; d < D; ++d) out[d] = uint32_t{a[d]} | (b != nullptr ? uint32_t{b[d]} << 16 : 0u);
}

}  // namespace needle::avx512
