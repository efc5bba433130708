// A decode step's selection and retention on the GPU (PlanExecutor::PlanDecode for
// --kv-placement device, engine/cuda/hybrid_device_plan.cc): the rules of sparse_attn/plan_rules.h,
// one thread block per row (a KV head, or the layer's one row with select mode layer), so that
// the host waits for no layer of the step.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace needle::cuda {

// The longest shortlist (topk + retained) SelectFromShortlist takes (its shared memory).
constexpr int64_t kMaxDeviceShortlist = 2048;

// For each row r (rows = by_layer ? 1 : kv_heads):
//   vals, ids [rows][want]: the row's shortlist, its first k entries valid (cuda::TopBlocks');
//   ret [kv_heads][R] (ascending) with rcount [kv_heads] (-1: no retention yet): the retention
//   the step selects with (by_layer: head 0's);
// writes, for every KV head h of the row:
//   sel [kv_heads][n_sel]: the selection, ascending (n_sel = min(topk, ctx_end - init_b), which
//   the rules always select);
//   kept [kv_heads][R], kcount [kv_heads]: the retained blocks kept (-1: no retention);
//   view [kv_heads][view_stride] at entries [view_at, view_at + n_sel) of each head: the slot of
//   each selected block in the layer's ring, table[sel[h][j]] (the attention's per-head block
//   table, KVLayerView::table_head_stride, reads them where they lie).
// Device memory throughout (table: the layer's block table, KVLayerView::table).
// SelectFromShortlist's arguments past the shortlist, as its kernels take them.
struct SelectArgs {
  const int32_t* ret = nullptr;
  const int32_t* rcount = nullptr;
  int R = 0;
  int32_t init_b = 0, ctx_end = 0;
  int topk = 0, kv_heads = 0;
  bool by_layer = false;
  const int32_t* table = nullptr;
  int n_sel = 0;
  int32_t *sel = nullptr, *kept = nullptr, *kcount = nullptr, *view = nullptr;
  int64_t view_stride = 0, view_at = 0;
  // Host placement planned on the GPU: a table per KV head (head h's at table + h *
  // table_head_stride; 0: one for every head), -1 for a block the GPU does not hold, which the
  // view then leaves a hole (the attention masks it); with cpu (not null), each head's holes as
  // positions in its selection, ascending, cpu [kv_heads][n_sel], their count cpu_count
  // [kv_heads]: what the CPU attends. Set after MakeSelectArgs.
  int64_t table_head_stride = 0;
  int32_t *cpu = nullptr, *cpu_count = nullptr;
};

// Its shared memory, in bytes, for a shortlist of k.
inline size_t SelectSharedBytes(int64_t k, int64_t R) {
  return static_cast<size_t>(2 * k + R + R + k + R + k) * 4;
}

// The same with its arguments gathered (SelectArgs) and checked, as the fused top-k takes them
// (block_select.h TopBlocksSelect).
SelectArgs MakeSelectArgs(int64_t want, int64_t k, const int32_t* ret, const int32_t* rcount,
                          int64_t R, int64_t init_b, int64_t ctx_end, int64_t topk,
                          int64_t kv_heads, bool by_layer, const int32_t* table, int64_t n_sel,
                          int32_t* sel, int32_t* kept, int32_t* kcount, int32_t* view,
                          int64_t view_stride, int64_t view_at);

void SelectFromShortlist(const float* vals, const int32_t* ids, int64_t want, int64_t k,
                         const int32_t* ret, const int32_t* rcount, int64_t R, int64_t init_b,
                         int64_t ctx_end, int64_t topk, int64_t kv_heads, bool by_layer,
                         const int32_t* table, int64_t n_sel, int32_t* sel, int32_t* kept,
                         int32_t* kcount, int32_t* view, int64_t view_stride, int64_t view_at,
                         cudaStream_t stream);
// The same with its arguments gathered (MakeSelectArgs).
void SelectFromShortlist(const float* vals, const int32_t* ids, int64_t want, int64_t k,
                         const SelectArgs& a, cudaStream_t stream);

// Retention for the layer's next step: from the selection sel [kv_heads][n] (ascending), its
// blocks' softmax sums stats ([kv_heads][n][tiles][G][2]: each block's in `tiles` parts, 1 for
// cuda::BlockStats', block_size / 32 for AttentionTileStats') and the step's lse
// [kv_heads * G] over everything it attended, writes ret [kv_heads][R] (ascending) and rcount
// [kv_heads] (by_layer: the masses summed over the KV heads in head order, one list for all).
// RetainByMass's arguments, as its kernels take them.
struct RetainArgs {
  const int32_t* sel = nullptr;
  int n = 0;
  const float* stats = nullptr;
  int tiles = 1;
  const float* lse = nullptr;
  int kv_heads = 0, G = 0;
  bool by_layer = false;
  int R = 0;
  int32_t *ret = nullptr, *rcount = nullptr;
};
RetainArgs MakeRetainArgs(const int32_t* sel, int64_t n, const float* stats, int64_t tiles,
                          const float* lse, int64_t kv_heads, int64_t G, bool by_layer, int64_t R,
                          int32_t* ret, int32_t* rcount);
// Its shared memory, in bytes.
size_t RetainSharedBytes(const RetainArgs& a);

void RetainByMass(const int32_t* sel, int64_t n, const float* stats, int64_t tiles,
                  const float* lse, int64_t kv_heads, int64_t G, bool by_layer, int64_t R,
                  int32_t* ret, int32_t* rcount, cudaStream_t stream);
// The same with its arguments gathered (MakeRetainArgs).
void RetainByMass(const RetainArgs& a, cudaStream_t stream);

}  // namespace needle::cuda
