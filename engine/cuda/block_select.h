// The hybrid engine's top-k of Context blocks, on the GPU where their scores are: only the
// shortlist crosses PCIe, and its cost does not grow with the candidates on the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/cuda/device_plan.h"

namespace needle::cuda {

// For each row r (a KV head; sum_heads: one row, the scores summed over the kv_heads rows in
// head order), the k = min(want, n) best candidates of scores [kv_heads][n] (block ids first + i)
// ranked as sparse_attn/ ranks them: higher score first, then lower block id. vals, ids:
// [rows][want], the first k of each row filled, in no particular order. Exact (radix select on
// (score, -id), which are distinct), one thread block per row.
void TopBlocks(const float* scores, int64_t kv_heads, int64_t n, bool sum_heads, int32_t first,
               int64_t want, float* vals, int32_t* ids, cudaStream_t stream);

// TopBlocks, then in the same kernel the device plan's selection of each row from its shortlist
// (device_plan.h SelectFromShortlist with sa: MakeSelectArgs(want, min(want, n), ...)), instead
// of a kernel of its own; retain (not null): before them, RetainByMass with those arguments
// (the layer's previous step's, whose retention sa reads). false, nothing launched: where it
// does not apply (its shared memory over 32 KB, a row layout that differs, nothing to select)
// or with NEEDLE_TOPK_SELECT=0.
// Whether TopBlocksSelect may fuse (NEEDLE_TOPK_SELECT=0: never, for comparisons; read once).
bool FusedSelectOn();
bool TopBlocksSelect(const float* scores, int64_t kv_heads, int64_t n, bool sum_heads,
                     int32_t first, int64_t want, float* vals, int32_t* ids, const SelectArgs& sa,
                     const RetainArgs* retain, cudaStream_t stream);

// Scoring's combined queries (sparse_attn/scoring.h GroupQueries) of one decode query q
// [heads, D] on the GPU: qa, qb [kv_heads, D], summed over each group's heads in head order, as
// the host sums them.
void GroupQueries(const float* q, int64_t heads, int64_t kv_heads, int64_t D, bool quest, float* qa,
                  float* qb, cudaStream_t stream);

// Scoring's combined queries of the chunks of a sparse prefill (GroupQueries of each): chunk c
// takes chunks[c * 3 + 1] queries from row chunks[c * 3] of q [rows, heads, D] (device), each
// first rotated by row chunks[c * 3 + 2] of rot_table ([rows][D], RotationRow's; -1: not rotated)
// as RotateRows rotates, then summed over tokens and each group's heads in that order, as the host
// sums them. out: device [n_chunks][2][kv_heads][D], qa then qb. chunks: device.
void GroupChunkQueries(const float* q, const int32_t* chunks, int64_t n_chunks, int64_t heads,
                       int64_t kv_heads, int64_t D, bool quest, const float* rot_table, float* out,
                       cudaStream_t stream);

}  // namespace needle::cuda
