// What the decode GEMV kernels (gemv.cu: f32 products on the CUDA cores; gemv_tc.cu: on the
// tensor cores) share: the launch parameters, the streaming weight load and the input load with
// the folded RMSNorm. Internal to engine/cuda/gemv*.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/cuda/device_util.cuh"
#include "engine/cuda/gemv.h"
#include "engine/cuda/l2_policy.cuh"

namespace needle::cuda::gemv_detail {

constexpr int kWarps = 4, kThreads = 32 * kWarps;

struct GemvParams {
  const float* x;                  // [T, K] f32, row-major
  int k8;                          // K / 8: 16-byte chunks per weight row
  int n;                           // outputs
  int tokens;                      // T
  int64_t out_rows[kMaxGemvOuts];  // rows of each output (the row stride of its y [T, rows])
  int64_t row_end[kMaxGemvOuts];   // rows of outputs 0..i together (kStore, kAdd)
  const uint4* w[kMaxGemvOuts];
  const void* bias[kMaxGemvOuts];
  DType bias_type[kMaxGemvOuts];
  float* y[kMaxGemvOuts];
  GemvNorm norm;
  GemvRope rope;
  bool evict_first;  // the weights' L2 policy (l2_policy.cuh)
};

// A weight chunk (each weight byte is read once per step): l2_policy.cuh's LoadOnce with the
// 256-byte sector group asked for.
__device__ __forceinline__ uint4 LoadStream(const uint4* p, uint64_t pol) {
  return LoadOnce<true>(p, pol);
}

// acc + sum_e w[e] x[e] over the 8 elements of one chunk (w: 8 bf16/f16, low half first).
template <bool kBF16>
__device__ __forceinline__ float Dot8(uint4 w, const float (&x)[8], float acc) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float lo, hi;
    if constexpr (kBF16) {
      lo = __uint_as_float(u[e] << 16);
      hi = __uint_as_float(u[e] & 0xffff0000u);
    } else {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u[e]));
      lo = f.x;
      hi = f.y;
    }
    acc = fmaf(lo, x[2 * e], acc);
    acc = fmaf(hi, x[2 * e + 1], acc);
  }
  return acc;
}

// Chunk c of input row m as loaded (8 floats in two halves), to be NormX'd: a kernel may issue
// these loads early, beside the weights', and use them later.
__device__ __forceinline__ void LoadXRaw(const GemvParams& p, int m, int c, float4& a, float4& b) {
  const float4* x4 =
      reinterpret_cast<const float4*>(p.x) + 2 * (static_cast<int64_t>(m) * p.k8 + c);
  a = __ldg(x4), b = __ldg(x4 + 1);
}

// x (chunk c of an input row) times the norm's weights when kNorm; ss += the squares of x.
template <bool kNorm>
__device__ __forceinline__ void NormX(const GemvParams& p, int c, float (&x)[8], float& ss) {
  if constexpr (kNorm) {
    float g[8];
    if (p.norm.g_type == DType::kF32) {
      const float4* g4 = static_cast<const float4*>(p.norm.g) + 2 * c;
      const float4 ga = __ldg(g4), gb = __ldg(g4 + 1);
      g[0] = ga.x, g[1] = ga.y, g[2] = ga.z, g[3] = ga.w;
      g[4] = gb.x, g[5] = gb.y, g[6] = gb.z, g[7] = gb.w;
    } else {
      Unpack8(__ldg(static_cast<const uint4*>(p.norm.g) + c), p.norm.g_type, g);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      ss = fmaf(x[e], x[e], ss);
      x[e] *= g[e];
    }
  }
}

// Chunk c of input row m (8 floats), times the norm's weights when kNorm; ss += the squares of x.
template <bool kNorm>
__device__ __forceinline__ void LoadX(const GemvParams& p, int m, int c, float (&x)[8], float& ss) {
  float4 a, b;
  LoadXRaw(p, m, c, a, b);
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  NormX<kNorm>(p, c, x, ss);
}

// Token tok's output of row gr of the outputs laid end to end (kStore, kAdd): its sum plus the
// bias, stored (kStore) or added (kAdd) to y.
template <GemvEpilogue kE>
__device__ __forceinline__ void StoreRow(const GemvParams& p, int64_t gr, int tok, float sum) {
  const int o = gr < p.row_end[0] ? 0 : (gr < p.row_end[1] ? 1 : 2);
  const int64_t row = gr - (o > 0 ? p.row_end[o - 1] : 0);
  const float v = sum + (p.bias[o] != nullptr ? LoadAs(p.bias[o], row, p.bias_type[o]) : 0.f);
  float& y = p.y[o][tok * p.out_rows[o] + row];
  if constexpr (kE == GemvEpilogue::kAdd)
    y += v;
  else
    y = v;
}
// kSiluMul's output of row `row`: silu(gate + bg) * (up + bu), gate and up its two sums.
__device__ __forceinline__ void StoreGate(const GemvParams& p, int64_t row, int tok, float gate,
                                          float up) {
  const float g = gate + (p.bias[0] != nullptr ? LoadAs(p.bias[0], row, p.bias_type[0]) : 0.f);
  const float u = up + (p.bias[1] != nullptr ? LoadAs(p.bias[1], row, p.bias_type[1]) : 0.f);
  p.y[0][tok * p.out_rows[0] + row] = g / (1.f + expf(-g)) * u;
}

// The tensor-core GEMV (gemv_tc.cu): 16-bit weights of wtype kBF16 only; epilogues kStore, kAdd
// and kSiluMul.
void LaunchTensorCore(const GemvParams& p, GemvEpilogue e, int64_t rows, cudaStream_t stream);

}  // namespace needle::cuda::gemv_detail
