// Programmatic dependent launch (sm_90): a kernel launched by LaunchDependent may be scheduled
// while the stream's previous kernel finishes, and do its set-up in that kernel's shadow. Stream
// capture records the dependency as a programmatic edge, so a replayed step overlaps the same way.
//
// Used by the decode attention (attention_decode_tma.cu): before the wait it reads the block
// table and has the copy engine bring the tiles of earlier steps' keys and values, while the
// kernel before it (RoPE + KV write) finishes; a table per KV head, whose entries the kernel
// before it writes (the device plan's selection, the hybrid's gather), it reads after the wait.
// The device plan's scoring (kernels.cu ScoreBlocksVecKernel) loads its first representatives
// before the wait (RoPE's query after it), and the top-k (block_select.cu) is resident and set up
// when the scores are done.
// RoPE + KV write (kernels.cu) computes its angles (double-precision sine and cosine) while the
// q/k/v projection finishes. At 4K keys, where the call is mostly fixed cost, that took about 0.05
// ms (1%, near the noise between runs) off a Qwen2.5-7B step on the H200 (bench/RESULTS.md). The
// GEMVs were tried too (H200, same run, Qwen2.5-7B at 4K): launched dependent and waiting before
// any load, the step took 4.75 ms instead of 4.50; with their first weight loads before the
// wait, 4.68; with an L2 prefetch of the next chunks as well, slower still. They launch as usual.
//
// The rules for a kernel launched by LaunchDependent:
//   - before WaitForPredecessor it reads only memory that no kernel of the stream writes during
//     the step (weights, the block table, the step's position, rows of earlier steps), and
//     writes nothing global;
//   - it calls WaitForPredecessor, then AllowSuccessor, on every path that reaches global
//     memory written in the step. WaitForPredecessor waits for the previous kernel to complete
//     with its writes visible; as that kernel ran after its own predecessor, everything earlier
//     in the stream is complete too. AllowSuccessor after the wait keeps at most two kernels of
//     the stream overlapping.
// A kernel launched without the attribute (or with NEEDLE_CUDA_PDL=0) runs after its predecessor
// as usual, and both calls are no-ops.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_util.cuh"

namespace needle::cuda {

__device__ __forceinline__ void WaitForPredecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void AllowSuccessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether LaunchDependent adds the dependency: on sm_90 and later unless NEEDLE_CUDA_PDL=0. Read
// at every launch (a recorded step keeps what it was recorded with).
inline bool DependentLaunchEnabled() {
  if (ComputeCapability() < 90) return false;
  const char* v = std::getenv("NEEDLE_CUDA_PDL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The plan's scoring and top-k launched dependent: DependentLaunchEnabled() unless
// NEEDLE_PLAN_PDL=0 (comparisons).
inline bool PlanDependentLaunch() {
  const char* v = std::getenv("NEEDLE_PLAN_PDL");
  return DependentLaunchEnabled() && (v == nullptr || std::strcmp(v, "0") != 0);
}

// kernel<<<grid, block, smem, stream>>>(args...), with a programmatic dependency on the stream's
// previous kernel when `dependent`.
template <typename... KArgs, typename... Args>
void LaunchMaybeDependent(bool dependent, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                          size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = dependent ? 1 : 0;
  NEEDLE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// LaunchMaybeDependent when DependentLaunchEnabled().
template <typename... KArgs, typename... Args>
void LaunchDependent(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                     cudaStream_t stream, Args&&... args) {
  LaunchMaybeDependent(DependentLaunchEnabled(), kernel, grid, block, smem, stream,
                       std::forward<Args>(args)...);
}

}  // namespace needle::cuda
