// One chunk of a sparse prefill as the hybrid engine's GPU attends it (PlanExecutor::PrefillChunk).
// The prompt's layer lies whole in the GPU's staging layer; the chunk's queries attend Initial,
// the selected Context blocks of their KV head and Local + the chunk itself. The GPU's causal
// kernel attends a block table's keys in order, so the layout puts those one after another:
//
//   view blocks  [Initial: init_end / B][selected: k][Local .. the chunk's last block]
//
// and the chunk's first query at position pos0 of the view, ie + k*B + (c0 - lb): with the keys
// rotated at their true positions, only the causal mask reads view positions, and it sees every
// selected key before the chunk. A selected rank i that holds different blocks for different KV
// heads is copied first, each head's block into extra slot x0 + ib + i. With position remapping
// (AppendQuerySpans' positions) every moved key is copied too, rotated by the opposite of the
// delta its span's query would be rotated by: q_rot(p + delta) . k = q . R(-delta) k, so the same
// scores as the CPU's spans, up to rounding. Initial then takes extra slots x0 .. x0 + ib.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <vector>

#include "sparse_attn/sparse_attention.h"

namespace needle {

struct ChunkLayout {
  std::vector<int32_t> table;  // view block -> staging slot
  // Head blocks (slot * kv_heads + head) to copy before the kernel runs: src -> dst, the keys
  // rotated by rot_table row rot[i] (-1: as they are). rot_table: [rows][head_dim], RotationRow's.
  std::vector<int32_t> src, dst, rot;
  std::vector<float> rot_table;
  int64_t pos0 = 0;  // the chunk's first query, in view positions
};

// Extra staging slots a chunk may need: Initial and topk selected blocks.
inline int64_t ChunkExtraSlots(int64_t init_end, int64_t topk, int64_t B) {
  return init_end / B + topk;
}

// ch: the planner's chunk (blocks: the same count k for every KV head); c0, T: its queries'
// positions [c0, c0 + T); B, kv_heads, head_dim: the cache's; slot_of(b): the staging slot of
// prompt block b; x0: the first extra slot (ChunkExtraSlots of them).
void LayoutChunk(const PlanExecutor::Chunk& ch, int64_t c0, int64_t T, int64_t B, int64_t kv_heads,
                 int64_t head_dim, const std::function<int32_t(int64_t)>& slot_of, int64_t x0,
                 ChunkLayout* out);

}  // namespace needle
