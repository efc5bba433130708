// Tensor-core prefill attention on the GPU (mma.sync m16n8k16, FlashAttention-2 style) for 16-bit
// KV caches: the fast path of cuda::Attention for prompts, where the CUDA-core kernel of
// attention.cu would be compute-bound. Decode (few queries) stays on that kernel, which splits
// the keys across blocks instead.
//
// Precision: Q and the probabilities P are rounded to the cache's type (bf16 or f16) before the
// tensor-core products, accumulation is f32; tests/test_cuda.cc holds the result to 2^-6 (bf16)
// and 2^-9 (f16) of the largest output, against 2e-5 for the f32 kernel.
#pragma once

#include <cuda_runtime.h>

#include "engine/cuda/attention_params.h"

namespace needle::cuda {

// Calls with fewer queries than this use the CUDA-core kernel.
constexpr int64_t kTcMinQueries = 64;

// Runs attention for p (one split: p.out and p.m = lse as MakeAttnParams sets them) and returns
// true when the case is supported: bf16/f16 cache, head_dim 64 or 128, block_size a multiple of
// 64, T >= kTcMinQueries, and the environment variable NEEDLE_CUDA_ATTN_TC is not "0" (for
// comparisons). Otherwise returns false and does nothing. On compute capability 9.0 it runs the
// wgmma kernel of attention_wgmma.h unless NEEDLE_CUDA_ATTN_TC is "mma".
bool TensorCoreAttention(const AttnParams& p, cudaStream_t stream);

}  // namespace needle::cuda
