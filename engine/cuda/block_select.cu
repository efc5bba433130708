#include "engine/cuda/block_select.h"

#include "engine/cuda/cuda_check.h"
#include "engine/cuda/top_row.cuh"

namespace needle::cuda {
namespace {

constexpr int kSelectThreads = 1024;

// One block per row (top_row.cuh).
__global__ void __launch_bounds__(kSelectThreads)
    TopBlocksKernel(const float* scores, int64_t Hk, int64_t n, bool sum, int32_t first,
                    int64_t want, float* vals, int32_t* ids) {
  TopRow(scores, Hk, n, sum, first, want, blockIdx.x, vals, ids);
}

__global__ void GroupQueriesKernel(const float* q, int64_t G, int64_t n, int64_t D, bool quest,
                                   float* qa, float* qb) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t h = i / D, d = i % D;
  float a = 0.f, b = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const float x = q[(h * G + g) * D + d];
    if (!quest) {
      a = __fadd_rn(a, x);
    } else {
      a = __fadd_rn(a, fmaxf(x, 0.f));
      b = __fadd_rn(b, fminf(x, 0.f));
    }
  }
  qa[i] = a;
  qb[i] = b;
}

// Block (x, c): threads of chunk c, one per (KV head, channel d).
__global__ void GroupChunkQueriesKernel(const float* q, const int32_t* chunks, int64_t heads,
                                        int64_t Hk, int64_t D, bool quest, const float* rot_table,
                                        float* out) {
  const int64_t c = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= Hk * D) return;
  const int64_t h = i / D, d = i % D, G = heads / Hk, half = D / 2;
  const int64_t t0 = chunks[c * 3], T = chunks[c * 3 + 1], r = chunks[c * 3 + 2];
  // The rotation of channel d: rotate-half pairs (j, j + half); the odd channel of an odd D stays.
  const int64_t j = d < half ? d : d - half;
  const bool rot = r >= 0 && d < 2 * half;
  const float cs = rot ? rot_table[r * D + j] : 1.f, sn = rot ? rot_table[r * D + half + j] : 0.f;
  const int64_t pair = d < half ? d + half : d - half;
  float a = 0.f, b = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    const float* row = q + ((t0 + t) * heads + h * G) * D;
#pragma unroll 4
    for (int64_t g = 0; g < G; ++g) {
      float x = row[g * D + d];
      if (rot) {
        const float p = row[g * D + pair];
        x = d < half ? __fsub_rn(__fmul_rn(x, cs), __fmul_rn(p, sn))
                     : __fadd_rn(__fmul_rn(x, cs), __fmul_rn(p, sn));
      }
      if (!quest) {
        a = __fadd_rn(a, x);
      } else {
        a = __fadd_rn(a, fmaxf(x, 0.f));
        b = __fadd_rn(b, fminf(x, 0.f));
      }
    }
  }
  out[(c * 2) * Hk * D + i] = a;
  out[(c * 2 + 1) * Hk * D + i] = b;
}

}  // namespace

void GroupChunkQueries(const float* q, const int32_t* chunks, int64_t n_chunks, int64_t heads,
                       int64_t kv_heads, int64_t D, bool quest, const float* rot_table, float* out,
                       cudaStream_t stream) {
  const int64_t n = kv_heads * D;
  if (n <= 0 || n_chunks <= 0) return;
  GroupChunkQueriesKernel<<<dim3(static_cast<unsigned>((n + 127) / 128),
                                 static_cast<unsigned>(n_chunks)),
                            128, 0, stream>>>(q, chunks, heads, kv_heads, D, quest, rot_table, out);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void GroupQueries(const float* q, int64_t heads, int64_t kv_heads, int64_t D, bool quest, float* qa,
                  float* qb, cudaStream_t stream) {
  const int64_t n = kv_heads * D;
  if (n <= 0) return;
  GroupQueriesKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      q, heads / kv_heads, n, D, quest, qa, qb);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

void TopBlocks(const float* scores, int64_t kv_heads, int64_t n, bool sum_heads, int32_t first,
               int64_t want, float* vals, int32_t* ids, cudaStream_t stream) {
  if (n <= 0 || want <= 0) return;
  const unsigned rows = sum_heads ? 1u : static_cast<unsigned>(kv_heads);
  TopBlocksKernel<<<rows, kSelectThreads, 0, stream>>>(scores, kv_heads, n, sum_heads, first, want,
                                                       vals, ids);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

}  // namespace needle::cuda
