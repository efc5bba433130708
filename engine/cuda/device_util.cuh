// Device helpers shared by the CUDA kernels (kernels.cu, attention*.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "engine/base/dtype.h"
#include "engine/cuda/cuda_check.h"

namespace needle::cuda {

// Element i of an f32 / f16 / bf16 array, as f32.
__device__ __forceinline__ float LoadAs(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// Element i of an f32 / f16 / bf16 array set from x (rounded to nearest).
__device__ __forceinline__ void StoreAs(void* p, int64_t i, DType t, float x) {
  switch (t) {
    case DType::kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
      break;
    case DType::kF16:
      static_cast<__half*>(p)[i] = __float2half_rn(x);
      break;
    default:
      static_cast<float*>(p)[i] = x;
  }
}

// The rotary embedding of one pair (a, b) = (x_j, x_{j + D/2}) at position pos with frequency
// inv_freq_j, as the CPU computes it: cos and sin of the f32 angle in double, times scaling
// (RopeAngle), then the rotation with every product and sum rounded on its own (no fused
// multiply-add), so that every kernel that rotates gets the CPU's bits.
struct RopeCs {
  float c, s;
};
__device__ __forceinline__ RopeCs RopeAngle(int64_t pos, float inv_freq, float scaling) {
  const float angle = __fmul_rn(static_cast<float>(pos), inv_freq);
  return {__fmul_rn(static_cast<float>(cos(static_cast<double>(angle))), scaling),
          __fmul_rn(static_cast<float>(sin(static_cast<double>(angle))), scaling)};
}
__device__ __forceinline__ void RopeApply(float& a, float& b, RopeCs r) {
  const float a0 = a, b0 = b;
  a = __fsub_rn(__fmul_rn(a0, r.c), __fmul_rn(b0, r.s));
  b = __fadd_rn(__fmul_rn(b0, r.c), __fmul_rn(a0, r.s));
}

// Row of token `pos` of KV head h in a block arena [slot][kv_head][B][D] (kvcache/kv_cache.h),
// through the block table (logical block -> slot; head h's own: HeadTable). The division is
// 32-bit: a 64-bit one is a slow subroutine call per key in the decode loop, and positions stay
// below 2^31.
__device__ __forceinline__ int64_t PagedRow(const int32_t* table, int64_t pos, int64_t B,
                                            int64_t kv_heads, int64_t h) {
  const uint32_t p32 = static_cast<uint32_t>(pos), b32 = static_cast<uint32_t>(B);
  return (static_cast<int64_t>(table[p32 / b32]) * kv_heads + h) * B + p32 % b32;
}

// The device's multiprocessors (the current device's, read once).
inline int Multiprocessors() {
  static const int n = [] {
    int dev = 0, sm = 0;
    NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
    NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
    return sm;
  }();
  return n;
}

// Compute capability of the current device as 10 * major + minor (90 for the H100), asked once
// per device: the kernels' entry points choose by it on every call.
inline int ComputeCapability() {
  static int cached[64] = {};  // 0: not asked yet
  int dev = 0;
  NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cached[dev] != 0) return cached[dev];
  int major = 0, minor = 0;
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (dev < 64) cached[dev] = 10 * major + minor;
  return 10 * major + minor;
}

// Opts `Kernel` in, once per kernel, to `bytes` of dynamic shared memory per block (above 48 KB
// a kernel must ask). Thread-safe: a function-local static per kernel.
template <auto Kernel>
void OptInSharedMemory(size_t bytes) {
  static const bool done = [bytes] {
    NEEDLE_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
    return true;
  }();
  (void)done;
}

// Eight 16-bit values (bf16 or f16, low half first) of a 16-byte load, as f32.
__device__ __forceinline__ void Unpack8(uint4 raw, DType t, float* out) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const uint16_t lo = static_cast<uint16_t>(w[e] & 0xffffu),
                   hi = static_cast<uint16_t>(w[e] >> 16);
    if (t == DType::kBF16) {
      out[2 * e] = __uint_as_float(static_cast<uint32_t>(lo) << 16);
      out[2 * e + 1] = __uint_as_float(static_cast<uint32_t>(hi) << 16);
    } else {
      out[2 * e] = __half2float(__ushort_as_half(lo));
      out[2 * e + 1] = __half2float(__ushort_as_half(hi));
    }
  }
}

// 2^x with the hardware approximation (2 ulp); exp2(-inf) = 0.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One row's online-softmax step in the log2 domain when a tile's maximum mx arrives: raises the
// running maximum m, and returns the reference the tile's exponents subtract (0 while m stays
// -inf, so that they give 0) and alpha = 2^(old m - ref), the rescale of what was accumulated.
struct MaxStep {
  float ref, alpha;
};
__device__ __forceinline__ MaxStep RaiseMax(float& m, float mx) {
  const float mn = fmaxf(m, mx);
  const float ref = mn == -INFINITY ? 0.f : mn;
  const MaxStep r{ref, Exp2(m - ref)};
  m = mn;
  return r;
}

// Two floats rounded to bf16 (kBF16) or f16 and packed low-first into 32 bits: the layout of a
// tensor-core operand register.
template <bool kBF16>
__device__ __forceinline__ uint32_t Pack(float a, float b) {
  if constexpr (kBF16) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// (a, b) as two Pack()ed registers with a ~ hi + lo: hi their 16-bit rounding, lo the 16-bit
// rounding of what hi leaves out (~16 bits of mantissa for bf16, ~22 for f16).
template <bool kBF16>
__device__ __forceinline__ void SplitHiLo(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = Pack<kBF16>(a, b);
  float2 r;
  if constexpr (kBF16) {
    r = make_float2(__uint_as_float(hi << 16), __uint_as_float(hi & 0xffff0000u));
  } else {
    r = __half22float2(*reinterpret_cast<const __half2*>(&hi));
  }
  lo = Pack<kBF16>(a - r.x, b - r.y);
}

}  // namespace needle::cuda
