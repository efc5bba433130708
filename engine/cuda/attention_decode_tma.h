// Flash-decoding on Hopper (compute capability 9.0 and up): one query token over a 16-bit block
// KV cache, the cache streamed into shared memory by the bulk tensor copy engine (TMA) and the
// products done on the tensor cores. The fast path of DecodeAttention (attention_decode.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_params.h"

namespace needle::cuda {

// True when p (T == 1; out/lse as MakeAttnParams set them) is a case of this kernel, which then
// has been launched on `stream`: a device of compute capability 9.0 or later, a build holding
// sm_90 code for it, a bf16/f16 cache with head_dim 64 or 128, at most 8 query heads per KV head,
// and block_size a multiple of 32. Otherwise returns false and does nothing.
bool TmaDecodeAttention(AttnParams p, int sm_count, AttnWorkspace& ws, cudaStream_t stream);

// How the kernel cuts `tiles` tiles of 32 visible keys among splits of whole tiles: one wave of
// one block per multiprocessor over the KV heads, at least one tile per warp, no split empty
// (bench_decode_floors.cu times the same cut).
struct TmaDecodeSplit {
  int64_t tiles_per_split, splits;
};
TmaDecodeSplit TmaDecodeSplitOf(int64_t tiles, int sm_count, int64_t kv_heads);

// The cut of one row of a batched call (TmaDecodeAttentionRows): TmaDecodeSplitOf's, with at
// least kMinRowSplitTiles tiles a split (4 a warp): the rows of a batch fill the GPU together,
// and one split per multiprocessor for each of them would leave each block a tile per warp. It
// depends on the row's own keys only, so a row gets the same bits in any batch (a batch of one
// included), not those of TmaDecodeAttention's cut. (NEEDLE_ROW_SPLIT_TILES=N: N instead.)
constexpr int64_t kMinRowSplitTiles = 16;
TmaDecodeSplit TmaDecodeRowSplitOf(int64_t tiles, int sm_count, int64_t kv_heads);

// One query row of a batched call: its own q [heads, D], block table, position (the keys
// [0, pos0] visible, within p.window) and out [heads, D] (no lse).
struct TmaDecodeRow {
  const float* q;
  const int32_t* table;
  int64_t pos0;
  float* out;
};
constexpr int kMaxTmaDecodeRows = 48;  // rows of one launch (passed as a kernel parameter)
// TmaDecodeAttention of n rows of different sequences over one arena in one launch (p: the
// common fields: arena, dtype, shape, scale, window; T == 1): each row cut by
// TmaDecodeRowSplitOf, so it gets the same bits in any batch. False (nothing done) where one call
// would be refused, or n is outside [1, kMaxTmaDecodeRows].
bool TmaDecodeAttentionRows(AttnParams p, const TmaDecodeRow* rows, int n, int sm_count,
                            AttnWorkspace& ws, cudaStream_t stream);

}  // namespace needle::cuda
