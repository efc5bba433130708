// The L2 policy of data a decode step streams once: the weights (gemv*.cu), the K/V tiles of the
// decode attention (attention_decode_tma.cu) and the representatives the device plan scores
// (kernels.cu). A 7B model's step reads 15 GB of weights through a 50 MB L2; at normal priority
// they push out what the next kernels read again within microseconds: the activations, block
// tables, plan state and the kernels' own code, which the step's small latency-bound kernels
// (the plan's scoring and top-k, RoPE, the attention's merge) then fetch from HBM. Marked
// evict-first, the streamed lines are the ones L2 replaces. NEEDLE_STREAM_EVICT_FIRST=0 streams
// them at normal priority (comparisons).
#pragma once

#include <cstdint>

#include "engine/base/switches.h"

namespace needle::cuda {

// Read once per process (the launch functions ask at every call: a few hundred times a step).
inline bool StreamEvictFirst() {
  static const bool on = EnvOnUnlessZero("NEEDLE_STREAM_EVICT_FIRST");
  return on;
}

// The cache-policy operand of a hinted load: evict-first, or normal (as without a hint).
__device__ __forceinline__ uint64_t StreamPolicy(bool evict_first) {
  uint64_t pol;
  if (evict_first)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  else
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}

// A 16-byte load read once: past L1, with L2 policy pol (StreamPolicy); kPrefetch256 also asks L2
// for the whole 256-byte sector group (the next threads' loads: the GEMVs' weight rows).
template <bool kPrefetch256>
__device__ __forceinline__ uint4 LoadOnce(const uint4* p, uint64_t pol) {
  uint4 r;
  if constexpr (kPrefetch256)
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p), "l"(pol));
  else
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p), "l"(pol));
  return r;
}

}  // namespace needle::cuda
