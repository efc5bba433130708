// The shortlist of one decode query in one launch: the grouped queries (cuda::GroupQueries), the
// block scores (cuda::ScoreBlocks) and each row's exact top-k (cuda::TopBlocks), which took three
// launches and about 40 us a sparse layer at 1M tokens on the H100 (ncu: 4.7 + 20.1 + 15.0 us,
// the scoring at 0.83 TB/s of its bf16 representatives). The hybrid engine waits for it at every
// sparse layer; device placement queues it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/base/dtype.h"

namespace needle::cuda {

// The `want` best candidates of blocks [first, first + n) for the decode query q (device
// [heads, D] f32), as GroupQueries + ScoreBlocks + TopBlocks give them (block_select.h,
// kernels.h): reps one layer's bf16 representatives [block][kv_heads][R][D]; scores (device
// [kv_heads][n]) receives the block scores (equal to ScoreBlocks' within f32 rounding: summed in
// another order); vals, ids (device [rows][want], rows = sum_heads ? 1 : kv_heads) the first
// min(want, n) of each row, in no particular order, exactly TopBlocks' of those scores.
// counters: device, 2 unsigned, zero before the first call; every call leaves them zero (the
// blocks that finish last find each row's top-k: they count arrivals there).
// false, nothing queued: a shape it does not take (f32 representatives, R * D / 8 not a divisor
// of 32, more than 2^31 - 1 items, query rows over 32 KiB); the caller then runs the three.
bool FusedShortlist(const float* q, int64_t heads, int64_t kv_heads, int64_t D, bool quest,
                    const void* reps, DType storage, int64_t R, int64_t first, int64_t n,
                    bool sum_heads, int64_t want, float* scores, float* vals, int32_t* ids,
                    unsigned* counters, cudaStream_t stream);

}  // namespace needle::cuda
