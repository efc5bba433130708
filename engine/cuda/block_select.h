// The hybrid engine's top-k of Context blocks, on the GPU where their scores are: only the
// shortlist crosses PCIe, and its cost does not grow with the candidates on the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace needle::cuda {

// For each row r (a KV head; sum_heads: one row, the scores summed over the kv_heads rows in
// head order), the k = min(want, n) best candidates of scores [kv_heads][n] (block ids first + i)
// ranked as sparse_attn/ ranks them: higher score first, then lower block id. vals, ids:
// [rows][want], the first k of each row filled, in no particular order. Exact (radix select on
// (score, -id), which are distinct), one thread block per row.
void TopBlocks(const float* scores, int64_t kv_heads, int64_t n, bool sum_heads, int32_t first,
               int64_t want, float* vals, int32_t* ids, cudaStream_t stream);

// Scoring's combined queries (sparse_attn/scoring.h GroupQueries) of one decode query q
// [heads, D] on the GPU: qa, qb [kv_heads, D], summed over each group's heads in head order, as
// the host sums them.
void GroupQueries(const float* q, int64_t heads, int64_t kv_heads, int64_t D, bool quest, float* qa,
                  float* qb, cudaStream_t stream);

}  // namespace needle::cuda
