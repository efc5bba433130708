// avx512.h: the CPU check.
#include "engine/cpu/avx512.h"

#include <cpuid.h>

#include <cstdint>

namespace needle::avx512 {
namespace {

bool Detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31)) &&  // F, BW, VL
                      (b & (1u << 17));                                            // DQ
  if (!avx512) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
  // The OS saves the AVX-512 state (XCR0 bits 5-7: opmask, ZMM upper halves, ZMM16-31).
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  uint32_t lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6) == 0xE6;
}

}  // namespace

bool HasBf16() {
  static const bool ok = Detect();
  return ok;
}

}  // namespace needle::avx512
