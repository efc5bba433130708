// The CUDA backend's element-wise kernels (kernels.cu). Every pointer is device memory; every
// launch goes on `stream` and is checked. Activations are f32; weights and the KV cache are f32,
// f16 or bf16 (`DType`), read as f32. Shapes are row-major, as in engine/cpu/ops.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/base/dtype.h"

namespace needle::cuda {

// out[T, H] = table[ids[t], :]  (table: [vocab, H] of dtype; ids: device [T])
void Embed(const void* table, DType dtype, const int32_t* ids, int64_t T, int64_t H, float* out,
           cudaStream_t stream);
// y[rows, D] = x * rsqrt(mean(x^2) + eps) * w[D]; y may alias x.
void RmsNorm(const float* x, int64_t rows, int64_t D, const void* w, DType wtype, float eps,
             float* y, cudaStream_t stream);
// x[T, heads, D] rotated in place, rotate-half pairs (i, i + D/2); angle = f32(pos0 + t) *
// inv_freq[i] (device [D/2]), cos/sin computed in double and multiplied by scaling (as the CPU).
void Rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t pos0, const float* inv_freq,
          float scaling, cudaStream_t stream);
// out[n] = silu(gate[n]) * up[n]; out may alias gate.
void SiluMul(const float* gate, const float* up, int64_t n, float* out, cudaStream_t stream);
// x[n] += y[n]
void Add(float* x, const float* y, int64_t n, cudaStream_t stream);
// y[T, N] += bias[N] (bias of dtype)
void AddBias(float* y, int64_t T, int64_t N, const void* bias, DType btype, cudaStream_t stream);
// dst[n] = src[n] converted to bf16 / f16 (dst_type), for cuBLAS inputs.
void ConvertF32(const float* src, int64_t n, void* dst, DType dst_type, cudaStream_t stream);
// Writes k, v [T, kv_heads, D] (f32) into a block arena [slot][kv_head][block][D] of dtype at
// positions [pos0, pos0 + T), through table (device [blocks], logical block -> slot).
void KVWrite(const float* k, const float* v, int64_t T, int64_t kv_heads, int64_t D, int64_t pos0,
             int64_t block_size, const int32_t* table, void* k_arena, void* v_arena, DType dtype,
             cudaStream_t stream);
// Decode's rotary embedding and cache write in one launch: q [T, heads, D] and k [T, kv_heads, D]
// rotated in place as Rope does, then k and v [T, kv_heads, D] written as KVWrite does. The
// position of token t is pos0 + t, or *dpos + t when dpos (device) is set (a recorded step).
void RopeKVWrite(float* q, float* k, const float* v, int64_t T, int64_t heads, int64_t kv_heads,
                 int64_t D, int64_t pos0, const int64_t* dpos, const float* inv_freq, float scaling,
                 int64_t block_size, const int32_t* table, void* k_arena, void* v_arena,
                 DType dtype, cudaStream_t stream);
// The k largest of logits[V] by descending value, ties: lower id first (device vals[k], ids[k]):
// greedy decoding (k = 1) and top-k sampling's candidates on the GPU. One block, k passes.
void TopK(const float* logits, int64_t V, int64_t k, float* vals, int32_t* ids,
          cudaStream_t stream);
// TopK of n rows at once: logits [n, V], vals and ids [n, k] (one block a row).
void TopKRows(const float* logits, int64_t n, int64_t V, int64_t k, float* vals, int32_t* ids,
              cudaStream_t stream);
// Where one decode row of a batch goes: its position and its cache's block table of the layer
// (device).
struct RowTarget {
  const int32_t* table;
  int64_t pos;
};
constexpr int kMaxRows = 64;  // rows of one batched launch (passed as a kernel parameter)
struct RowTargets {
  RowTarget r[kMaxRows];
};
// RopeKVWrite of n <= kMaxRows rows of different sequences (one decode step of a batch), each as
// RopeKVWrite of that row alone would do it: row i of q [n, heads, D], k and v [n, kv_heads, D]
// at position rows.r[i].pos through rows.r[i].table; every cache one pool's (k_arena, v_arena);
// one set of frequencies.
void RopeKVWriteRows(float* q, float* k, const float* v, int64_t n, int64_t heads, int64_t kv_heads,
                     int64_t D, const RowTargets& rows, const float* inv_freq, float scaling,
                     int64_t block_size, void* k_arena, void* v_arena, DType dtype,
                     cudaStream_t stream);

// Block scores of sparse attention (sparse_attn/scoring.h) for blocks [first, first + n):
// scores[h * n + i] = qa[h] . r0 + qb[h] . r1 of block first + i, head h, where reps is one
// layer's representatives [block][kv_heads][R][D] of `storage` (bf16 or f32), r1 = row 1 (Quest,
// R == 2). qa, qb: [kv_heads, D] f32 (GroupQueries).
void ScoreBlocks(const void* reps, DType storage, int64_t R, int64_t first, int64_t n,
                 int64_t kv_heads, int64_t D, const float* qa, const float* qb, float* scores,
                 cudaStream_t stream);

// ScoreBlocks of the decode query q [kv_heads * G, D] (device) itself: where the vector kernel
// runs (bf16 representatives) it sums each group's queries as GroupQueries does, bit for bit,
// instead of a kernel of its own before it; elsewhere GroupQueries into qa, qb (device scratch
// [kv_heads, D] each), then ScoreBlocks. NEEDLE_SCORE_GROUPED=0: always the latter.
void ScoreBlocksFromQuery(const void* reps, DType storage, int64_t R, int64_t first, int64_t n,
                          int64_t kv_heads, int64_t G, int64_t D, const float* q, bool quest,
                          float* qa, float* qb, float* scores, cudaStream_t stream);

// The log-sum-exp merge of two attention results over disjoint keys (engine/attention/partial.h
// for normalised outputs): for each row r (a query head), with w_x = exp(lse_x[r] - M),
//   out[r] = (w_a out_a[r] + w_b out_b[r]) / (w_a + w_b),  lse[r] = M + log(w_a + w_b).
// out_a, out_b, out: [rows, D]; lse_a, lse_b, lse: [rows] (lse may be null). An empty side has
// lse -inf. out may alias out_a or out_b. The hybrid engine's GPU window + CPU blocks.
void MergeAttention(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b,
                    int64_t rows, int64_t D, float* out, float* lse, cudaStream_t stream);

}  // namespace needle::cuda
