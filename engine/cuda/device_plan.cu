#include "engine/cuda/device_plan.h"

#include "engine/base/error.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/plan_rows.cuh"
#include "sparse_attn/plan_rules.h"

namespace needle::cuda {
namespace {

namespace pr = plan_rules;

constexpr int kThreads = 128;

// Block r: row r (plan_rows.cuh).
__global__ void __launch_bounds__(kThreads)
    SelectKernel(const float* vals, const int32_t* ids, int64_t want, int k, SelectArgs a) {
  extern __shared__ int32_t smem[];
  SelectRow(a, vals, ids, want, k, smem);
}

// Block r: row r (plan_rows.cuh).
__global__ void __launch_bounds__(kThreads) RetainKernel(RetainArgs a) {
  extern __shared__ int32_t smem[];
  RetainRow(a, smem);
}

}  // namespace

SelectArgs MakeSelectArgs(int64_t want, int64_t k, const int32_t* ret, const int32_t* rcount,
                          int64_t R, int64_t init_b, int64_t ctx_end, int64_t topk,
                          int64_t kv_heads, bool by_layer, const int32_t* table, int64_t n_sel,
                          int32_t* sel, int32_t* kept, int32_t* kcount, int32_t* view,
                          int64_t view_stride, int64_t view_at) {
  NEEDLE_CHECK(k <= want && want <= kMaxDeviceShortlist && n_sel <= topk && R <= topk &&
               view_at + n_sel <= view_stride);
  SelectArgs a;
  a.ret = ret, a.rcount = rcount, a.R = static_cast<int>(R);
  a.init_b = static_cast<int32_t>(init_b), a.ctx_end = static_cast<int32_t>(ctx_end);
  a.topk = static_cast<int>(topk), a.kv_heads = static_cast<int>(kv_heads), a.by_layer = by_layer;
  a.table = table, a.n_sel = static_cast<int>(n_sel);
  a.sel = sel, a.kept = kept, a.kcount = kcount, a.view = view;
  a.view_stride = view_stride, a.view_at = view_at;
  return a;
}

void SelectFromShortlist(const float* vals, const int32_t* ids, int64_t want, int64_t k,
                         const int32_t* ret, const int32_t* rcount, int64_t R, int64_t init_b,
                         int64_t ctx_end, int64_t topk, int64_t kv_heads, bool by_layer,
                         const int32_t* table, int64_t n_sel, int32_t* sel, int32_t* kept,
                         int32_t* kcount, int32_t* view, int64_t view_stride, int64_t view_at,
                         cudaStream_t stream) {
  SelectFromShortlist(
      vals, ids, want, k,
      MakeSelectArgs(want, k, ret, rcount, R, init_b, ctx_end, topk, kv_heads, by_layer, table,
                     n_sel, sel, kept, kcount, view, view_stride, view_at),
      stream);
}

void SelectFromShortlist(const float* vals, const int32_t* ids, int64_t want, int64_t k,
                         const SelectArgs& a, cudaStream_t stream) {
  if (a.n_sel <= 0) return;
  SelectKernel<<<static_cast<unsigned>(a.by_layer ? 1 : a.kv_heads), kThreads,
                 SelectSharedBytes(k, a.R), stream>>>(vals, ids, want, static_cast<int>(k), a);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

RetainArgs MakeRetainArgs(const int32_t* sel, int64_t n, const float* stats, int64_t tiles,
                          const float* lse, int64_t kv_heads, int64_t G, bool by_layer, int64_t R,
                          int32_t* ret, int32_t* rcount) {
  NEEDLE_CHECK(n <= kMaxDeviceShortlist && tiles >= 1);
  RetainArgs a;
  a.sel = sel, a.n = static_cast<int>(n), a.stats = stats, a.tiles = static_cast<int>(tiles);
  a.lse = lse, a.kv_heads = static_cast<int>(kv_heads), a.G = static_cast<int>(G);
  a.by_layer = by_layer, a.R = static_cast<int>(R), a.ret = ret, a.rcount = rcount;
  return a;
}

size_t RetainSharedBytes(const RetainArgs& a) {
  const int64_t rows_heads = a.by_layer ? a.kv_heads : 1;
  return static_cast<size_t>(3 * a.n + a.R + 4 * a.n + rows_heads * a.n * a.tiles) * 4;
}

void RetainByMass(const int32_t* sel, int64_t n, const float* stats, int64_t tiles,
                  const float* lse, int64_t kv_heads, int64_t G, bool by_layer, int64_t R,
                  int32_t* ret, int32_t* rcount, cudaStream_t stream) {
  RetainByMass(MakeRetainArgs(sel, n, stats, tiles, lse, kv_heads, G, by_layer, R, ret, rcount),
               stream);
}

void RetainByMass(const RetainArgs& a, cudaStream_t stream) {
  if (a.n <= 0 || a.R <= 0) return;
  const size_t smem = RetainSharedBytes(a);
  NEEDLE_CHECK(smem <= 48 * 1024);
  RetainKernel<<<static_cast<unsigned>(a.by_layer ? 1 : a.kv_heads), kThreads, smem, stream>>>(a);
  NEEDLE_CUDA_CHECK_LAUNCH();
}

}  // namespace needle::cuda
