// Shared-memory staging helpers of the attention kernels: the 128-byte swizzle, mbarriers, the
// bulk tensor copy (TMA, sm_90) and the proxy fences between them.
#pragma once

#include <cstdint>

namespace needle::cuda {

// Byte offset of 16-byte chunk c (8 16-bit elements) of row r in a swizzled [rows x D] tile:
// D/64 column atoms [rows][128 bytes], chunk c of row r stored at chunk (c % 8) ^ (r % 8) of its
// atom's row. The layout of wgmma's 128B-swizzle operands and of a TMA box copied with
// CU_TENSOR_MAP_SWIZZLE_128B (atoms 1024-byte aligned).
__device__ __forceinline__ uint32_t SwizzledChunk(int rows, int r, int c) {
  return static_cast<uint32_t>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Ordinary and cp.async accesses to shared memory, ordered before the async proxy's (tensor
// cores, copy engine) that follow the next barrier.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// 16 bytes from global memory to shared memory at dst (a 32-bit shared address), in the
// background, bypassing L1; src-size 0 (valid false) fills them with zeros instead and reads
// nothing. kStream also asks L2 for the whole 256-byte sector group (the next lanes' copies).
template <bool kStream = false>
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  if constexpr (kStream)
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
// Closes this thread's copies issued since the last commit into one group (possibly empty).
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's groups are pending: the older ones are complete and
// visible to this thread (to others only after a barrier).
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// mbarriers in shared::cta, addressed by their 32-bit shared address.
__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes initialised mbarriers visible to the copy engine (sm_90).
__device__ __forceinline__ void FenceMbarInit() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
// Arrives and adds `bytes` to the transaction count the phase waits for (sm_90).
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Whether the phase of the given parity has completed, without waiting.
__device__ __forceinline__ bool MbarTest(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

// The box of a 2-D tensor map (a CUtensorMap kernel parameter, __grid_constant__) at element
// coordinates (c0 innermost, c1) into shared memory at dst; completes on mbarrier bar (sm_90).
__device__ __forceinline__ void TmaLoad2d(uint32_t dst, const void* tensor_map, int c0, int c1,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
// TmaLoad2d with an L2 cache policy (l2_policy.cuh StreamPolicy).
__device__ __forceinline__ void TmaLoad2d(uint32_t dst, const void* tensor_map, int c0, int c1,
                                          uint32_t bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
      "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(bar), "l"(pol)
      : "memory");
}

}  // namespace needle::cuda
