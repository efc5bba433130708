// What every attention kernel of engine/cuda reads: one struct, filled once per call by
// MakeAttnParams (attention.cu) and passed by value to the kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include "engine/base/dtype.h"
#include "engine/cpu/ops.h"
#include "kvcache/kv_cache.h"

namespace needle::cuda {

struct AttnParams {
  const float* q;  // [T, heads, D] f32, device
  const void* k;   // arena [slot][kv_head][B][D] in `dtype`, device
  const void* v;
  const int32_t* table;       // block table (logical block -> slot), device
  int64_t table_head_stride;  // KVLayerView::table_head_stride: head h's table at table + h * it
  // Keys whose table entries the kernel before writes (KVLayerView::table_step_lo/hi; empty for
  // a table shared by every head).
  int64_t table_late_lo, table_late_hi;
  DType dtype;
  int64_t T, pos0, heads, kv_heads, D, B, window, n_keys;  // n_keys = pos0 + T
  int64_t arena_rows;  // rows of the K (and V) arena: slots * kv_heads * B
  float scale;
  int G;  // query heads per KV head
  // Set by the tile and decode kernels' launch (attention.cu); the tensor-core kernel uses one
  // split.
  int QT, splits;
  int64_t keys_per_split;
  float* out;  // splits == 1: [T, heads, D], else partial [splits, T, heads, D]
  float* m;    // splits == 1: lse [T, heads] or nullptr; else [splits, T, heads] running max
  float* l;    // splits > 1: [splits, T, heads] sums
  // Decode steps replayed from a recording (CUDA graph): when set, the kernel reads pos0 from
  // here (device, written before the step runs) and cuts the visible keys into `splits` itself;
  // pos0, n_keys and keys_per_split above are then those of the step that was recorded. Only
  // the TMA decode kernel reads it.
  const int64_t* dpos;
  // Optional, TMA decode kernel only (AttentionTileStats): the softmax sums of every 32-key tile
  // of the keys [stats_key0, stats_key_end) (tile-aligned), tile_stats [kv_heads][tiles][G][2] =
  // {m, l}: m a reference maximum (natural log, scale applied), l the sum of exp(s - m) over the
  // tile's keys.
  float* tile_stats;
  int64_t stats_key0, stats_key_end;
  // TMA decode kernel only: the K/V tiles read evict-first from L2 (l2_policy.cuh), set by its
  // launch.
  bool evict_first;
};

// The fields of one call (one split: out and lse as given).
inline AttnParams MakeAttnParams(const float* q, const KVLayerView& kv, const AttnArgs& a,
                                 float* out, float* lse) {
  AttnParams p{};
  p.q = q;
  p.k = kv.k;
  p.v = kv.v;
  p.table = kv.table;
  p.table_head_stride = kv.table_head_stride;
  p.table_late_lo = kv.table_head_stride != 0 ? kv.table_step_lo : 0;
  p.table_late_hi = kv.table_head_stride != 0 ? kv.table_step_hi : 0;
  p.dtype = kv.dtype;
  p.T = a.T;
  p.pos0 = a.pos0;
  p.heads = a.heads;
  p.kv_heads = a.kv_heads;
  p.D = a.head_dim;
  p.B = kv.block_size;
  p.arena_rows = kv.slots * kv.kv_heads * kv.block_size;
  p.window = a.window;
  p.n_keys = a.pos0 + a.T;
  p.scale = a.scale;
  p.G = static_cast<int>(a.heads / a.kv_heads);
  p.splits = 1;
  p.out = out;
  p.m = lse;
  return p;
}

// For a 16-bit cache (bf16/f16) with head_dim 64 or 128: calls
// launch(std::integral_constant<int, D>, std::bool_constant<bf16>) and returns true; otherwise
// returns false. The tensor-core kernels' one dispatch over their four instantiations.
template <typename F>
bool Dispatch16Bit(const AttnParams& p, F&& launch) {
  const bool bf16 = p.dtype == DType::kBF16;
  if ((!bf16 && p.dtype != DType::kF16) || (p.D != 64 && p.D != 128)) return false;
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (p.D == 64)
    bf16 ? launch(D64{}, std::true_type{}) : launch(D64{}, std::false_type{});
  else
    bf16 ? launch(D128{}, std::true_type{}) : launch(D128{}, std::false_type{});
  return true;
}

}  // namespace needle::cuda
