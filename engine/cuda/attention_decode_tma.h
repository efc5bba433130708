// Flash-decoding on Hopper (compute capability 9.0 and up): one query token over a 16-bit block
// KV cache, the cache streamed into shared memory by the bulk tensor copy engine (TMA) and the
// products done on the tensor cores. The fast path of DecodeAttention (attention_decode.h).
#pragma once

#include <cuda_runtime.h>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_params.h"

namespace needle::cuda {

// True when p (T == 1; out/lse as MakeAttnParams set them) is a case of this kernel, which then
// has been launched on `stream`: a device of compute capability 9.0 or later, a build holding
// sm_90 code for it, a bf16/f16 cache with head_dim 64 or 128, at most 8 query heads per KV head,
// and block_size a multiple of 32. Otherwise returns false and does nothing.
bool TmaDecodeAttention(AttnParams p, int sm_count, AttnWorkspace& ws, cudaStream_t stream);

}  // namespace needle::cuda
