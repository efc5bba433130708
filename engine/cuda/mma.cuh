// Warp-level tensor-core helpers (mma.sync m16n8k16, ldmatrix, movmatrix) of the attention
// kernels. Fragment layouts (PTX ISA, m16n8k16 with 16-bit inputs), lane = 4 g + t:
//   A [16 x 16] row-major, 4 registers: {row g, cols 2t, 2t+1}, {row g+8, same cols},
//     {row g, cols 2t+8, 2t+9}, {row g+8, cols 2t+8, 2t+9};
//   B [16 x 8] column-major, 2 registers: {rows 2t, 2t+1; col g}, {rows 2t+8, 2t+9; col g};
//   C/D [16 x 8] f32, 4 floats: row g cols 2t, 2t+1, then row g+8 cols 2t, 2t+1.
#pragma once

#include <cstdint>

namespace needle::cuda {

// d[4] += a[4] * b[2]: m16n8k16, row-major A, column-major B, f32 accumulators.
template <bool kBF16>
__device__ __forceinline__ void Mma(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Four 8x8 16-bit matrices from shared memory: lanes 8i..8i+7 give the row addresses of matrix
// i, which lands in r[i] (lane 4g + t: row g, elements 2t, 2t+1).
__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// The same, transposed: lane 4g + t gets rows 2t, 2t+1 of column g of matrix i.
__device__ __forceinline__ void Ldsm4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// Transposes an 8x8 16-bit matrix held in the fragment layout (lane 4g + t: row g, elements 2t,
// 2t+1) across the warp.
__device__ __forceinline__ uint32_t MovTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

}  // namespace needle::cuda
