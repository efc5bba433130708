// Element types of weights, activations and the KV cache, and the scalar conversions that the
// reference kernels use (the fast kernels convert with Highway, to the same values).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace needle {

enum class DType : uint8_t { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

size_t DTypeSize(DType t);
const char* DTypeName(DType t);  // safetensors spelling: "F32", "BF16", ...
// Parses a safetensors dtype string; returns false for an unknown one.
bool ParseSafetensorsDType(const std::string& s, DType* out);
// Parses a user-facing name: f32|float32, f16|float16, bf16|bfloat16. Throws on anything else,
// naming `what` (the option or field) and the value.
DType ParseFloatDType(const std::string& s, const std::string& what);
bool IsFloatWeightType(DType t);  // F32, F16, BF16: the types the kernels read

inline float BF16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept quiet: the rounding torch uses for .to(torch.bfloat16).
inline uint16_t F32ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// lo and hi rounded to bf16 (as F32ToBF16) in one 32-bit word, lo in the low half: the operand
// layout of the bf16 pair dot products (vdpbf16ps, the AMX tiles).
inline uint32_t BF16Pair(float lo, float hi) {
  return uint32_t{F32ToBF16(lo)} | uint32_t{F32ToBF16(hi)} << 16;
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);  // round to nearest even, as _mm_cvtps_ph and torch

// Loads element i of a float-typed array as f32.
inline float LoadAsF32(DType t, const void* p, size_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kBF16:
      return BF16ToF32(static_cast<const uint16_t*>(p)[i]);
    case DType::kF16:
      return F16ToF32(static_cast<const uint16_t*>(p)[i]);
    default:
      return 0.0f;  // callers validate types at load time
  }
}

inline void StoreFromF32(DType t, void* p, size_t i, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kBF16:
      static_cast<uint16_t*>(p)[i] = F32ToBF16(v);
      break;
    case DType::kF16:
      static_cast<uint16_t*>(p)[i] = F32ToF16(v);
      break;
    default:
      break;
  }
}

}  // namespace needle
