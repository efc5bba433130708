// Hopper (sm_90a) tensor-core prefill attention with warpgroup matrix products (wgmma): the fast
// path of TensorCoreAttention (attention_tc.h) on compute capability 9.0, in builds whose CUDA
// architectures include 90a (the default). Same inputs, outputs and precision as the mma.sync
// kernel: Q and P rounded to the cache's 16-bit type, f32 accumulation.
#pragma once

#include <cuda_runtime.h>

#include "engine/cuda/attention_params.h"

namespace needle::cuda {

// Whether this build holds the sm_90a kernel (CMake defines NEEDLE_WGMMA when the CUDA
// architectures include 90a).
bool WgmmaCompiled();

// Runs attention for p (one split) and returns true when the build has the kernel and the case is
// supported (bf16/f16 cache, head_dim 64 or 128, block_size a multiple of 64); otherwise returns
// false and does nothing. The caller checks that the device is compute capability 9.0.
bool WgmmaAttention(const AttnParams& p, cudaStream_t stream);

}  // namespace needle::cuda
