#include "engine/base/dtype.h"

#include <cmath>

#include "engine/base/error.h"

namespace needle {

namespace {
struct Entry {
  DType t;
  const char* name;
  size_t size;
};
constexpr Entry kTable[] = {
    {DType::kF32, "F32", 4},   {DType::kF16, "F16", 2}, {DType::kBF16, "BF16", 2},
    {DType::kF64, "F64", 8},   {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},   {DType::kI8, "I8", 1},   {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
};
}  // namespace

size_t DTypeSize(DType t) {
  for (const auto& e : kTable)
    if (e.t == t) return e.size;
  return 0;
}

const char* DTypeName(DType t) {
  for (const auto& e : kTable)
    if (e.t == t) return e.name;
  return "?";
}

bool ParseSafetensorsDType(const std::string& s, DType* out) {
  for (const auto& e : kTable) {
    if (s == e.name) {
      *out = e.t;
      return true;
    }
  }
  return false;
}

DType ParseFloatDType(const std::string& s, const std::string& what) {
  if (s == "f32" || s == "float32" || s == "F32") return DType::kF32;
  if (s == "f16" || s == "float16" || s == "F16") return DType::kF16;
  if (s == "bf16" || s == "bfloat16" || s == "BF16") return DType::kBF16;
  Fail(what, ": unknown data type '", s, "' (expected f32, f16 or bf16)");
}

bool IsFloatWeightType(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: value = man * 2^-24
      float f = std::ldexp(static_cast<float>(man), -24);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf
  if (abs < 0x38800000u) {                        // subnormal or zero in f16
    float a;
    std::memcpy(&a, &abs, 4);
    // Scale so that one f16 subnormal step is 1.0, then round to nearest even.
    float scaled = a * 16777216.0f;  // 2^24
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  uint32_t e = (abs >> 23) - 112;
  uint32_t m = abs & 0x7fffffu;
  uint32_t out = (e << 10) | (m >> 13);
  const uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (out & 1u))) out++;
  return sign | static_cast<uint16_t>(out);
}

}  // namespace needle
