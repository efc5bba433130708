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
#include <cstdlib>
#include <cstring>

namespace needle::cuda {

// Read once per call of a kernel's launch function (a recorded step keeps its value).
inline bool StreamEvictFirst() {
  const char* v = std::getenv("NEEDLE_STREAM_EVICT_FIRST");
  return v == nullptr || std::strcmp(v, "0") != 0;
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

}  // namespace needle::cuda
