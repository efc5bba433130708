// Hopper warpgroup matrix products (wgmma, sm_90a) used by attention_wgmma.cu. The operand lists
// are written out because inline PTX cannot take an array: d[] is the warpgroup's f32
// accumulator fragment (m64nN: N/2 floats per thread; warp w of the group holds rows 16w..16w+15,
// thread lane holds rows lane/4 and lane/4 + 8, columns 8j + 2(lane%4) + {0,1} at d[4j..4j+3]).
// Shared-memory operands are described by 64-bit matrix descriptors (MakeDesc).
#pragma once

#include <cstdint>

namespace needle::cuda::wgmma {

// Descriptor of a 128-byte-swizzled shared-memory tile: start address, leading and stride byte
// offsets (each >> 4, 14 bits), layout type 1 = 128B swizzle in bits 62-63. The swizzle atom
// (8 rows of 128 bytes) must be 1024-byte aligned; the start may move by 32/64/96 bytes inside
// an atom to step along K.
__device__ __forceinline__ uint64_t MakeDesc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32 | 1ull << 62;
}

__device__ __forceinline__ void Fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void Commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void Wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across a wgmma wait.
template <int N>
__device__ __forceinline__ void FenceRegs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The PTX of each shape, for TY = bf16 or f16 (inputs), f32 accumulators; scale-d is a
// predicate made from the last input operand. The accumulators are operands %0.. of every shape:
// their list in the PTX text and their asm constraints are spelled once.
#define NEEDLE_WGMMA_R32                                                                       \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define NEEDLE_WGMMA_ACC32 "{" NEEDLE_WGMMA_R32 "}"
#define NEEDLE_WGMMA_ACC64                                                                       \
  "{" NEEDLE_WGMMA_R32                                                                           \
  ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
  "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define NEEDLE_WGMMA_D32                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define NEEDLE_WGMMA_D64                                                                          \
  NEEDLE_WGMMA_D32, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]),  \
      "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),  \
      "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]),  \
      "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

#define NEEDLE_WGMMA_SS128(TY)                                                          \
  asm volatile(                                                                         \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                      \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." #TY "." #TY " " NEEDLE_WGMMA_ACC64 \
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                 \
      : NEEDLE_WGMMA_D64                                                                \
      : "l"(da), "l"(db), "r"(scale_d))

#define NEEDLE_WGMMA_RS64(TY)                                                          \
  asm volatile(                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                     \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." #TY "." #TY " " NEEDLE_WGMMA_ACC32 \
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                  \
      : NEEDLE_WGMMA_D32                                                               \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))

#define NEEDLE_WGMMA_RS128(TY)                                                          \
  asm volatile(                                                                         \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                      \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." #TY "." #TY " " NEEDLE_WGMMA_ACC64 \
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                   \
      : NEEDLE_WGMMA_D64                                                                \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d))

// d[64] = (scale_d ? d : 0) + A B: m64n128k16, A [64 x 16] and B [128 x 16] both K-major in
// shared memory (descriptors da, db).
template <bool kBF16>
__device__ __forceinline__ void SS128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (kBF16)
    NEEDLE_WGMMA_SS128(bf16);
  else
    NEEDLE_WGMMA_SS128(f16);
}

// d[N/2] = (scale_d ? d : 0) + A B: m64nNk16, A [64 x 16] in registers (the mma.sync m16n8k16 A
// fragment of each warp's 16 rows), B [16 x N] N-major (transposed) in shared memory.
template <bool kBF16>
__device__ __forceinline__ void RS64(float (&d)[32], const uint32_t (&a)[4], uint64_t db,
                                     int scale_d) {
  if constexpr (kBF16)
    NEEDLE_WGMMA_RS64(bf16);
  else
    NEEDLE_WGMMA_RS64(f16);
}
template <bool kBF16>
__device__ __forceinline__ void RS128(float (&d)[64], const uint32_t (&a)[4], uint64_t db,
                                      int scale_d) {
  if constexpr (kBF16)
    NEEDLE_WGMMA_RS128(bf16);
  else
    NEEDLE_WGMMA_RS128(f16);
}

#undef NEEDLE_WGMMA_SS128
#undef NEEDLE_WGMMA_RS64
#undef NEEDLE_WGMMA_RS128
#undef NEEDLE_WGMMA_R32
#undef NEEDLE_WGMMA_ACC32
#undef NEEDLE_WGMMA_ACC64
#undef NEEDLE_WGMMA_D32
#undef NEEDLE_WGMMA_D64

}  // namespace needle::cuda::wgmma
