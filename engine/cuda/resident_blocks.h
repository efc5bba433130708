// Which Context blocks the hybrid engine's GPU holds, per sparse layer and KV head, in the
// layer's extra ring slots (KVCacheShape::extra_blocks), and what one step must copy there.
//
// The GPU attends n_g of each KV head's selected Context blocks (SparseConfig::gpu_share). They
// stay in the slots after the step: a block selected again at a later step (retention keeps
// retain_blocks of them, and consecutive queries select much the same blocks) is attended where it
// lies, so only blocks new to the GPU cross PCIe. Plain bookkeeping, no CUDA: the hybrid turns
// the copies into one cuda::GatherBlocks call.
//
// Slot j of head h means head h's part of extra slot j (the slot holds every KV head's block,
// [kv_head][block_size][head_dim], but each head's may come from another block). The GPU attends
// slots [0, n_g) of every head through one block table, so each head's chosen blocks must lie in
// exactly those slots.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace needle {

class ResidentBlocks {
 public:
  // A head block to copy into slot `to` of `head`: from the host cache (from < 0) or from the
  // same head's slot `from` (>= n_g; it stays there too).
  struct Copy {
    int32_t block = 0;
    int32_t head = 0;
    int32_t from = -1;
    int32_t to = 0;
  };

  ResidentBlocks() = default;
  ResidentBlocks(int64_t layers, int64_t kv_heads, int64_t slots);

  void Clear();  // every slot empty (a new sequence or prompt)
  // Every slot of `layer` empty (something else wrote them: the device plan's gather).
  void ClearLayer(int64_t layer);

  // One step of `layer`: of each KV head h's selection blocks[h] (any order, distinct), the GPU
  // attends n_g (<= slots, <= every blocks[h].size()): those already in slots [0, n_g) stay where
  // they are; those in later slots are copied from there; then blocks new to the GPU from the
  // host, the ones in retained[h] first (they are likely to be selected again), then the rest in
  // blocks[h]'s order. Afterwards slot j < n_g of head h holds At(layer, h, j). `copies`: what the
  // step must copy (every `to` distinct; no copy reads a slot another one writes).
  void Place(int64_t layer, const std::vector<std::vector<int32_t>>& blocks,
             const std::vector<std::vector<int32_t>>& retained, int64_t n_g,
             std::vector<Copy>* copies);

  int32_t At(int64_t layer, int64_t head, int64_t slot) const {  // -1: empty
    return held_[static_cast<size_t>((layer * kv_heads_ + head) * slots_ + slot)];
  }
  int64_t slots() const { return slots_; }

 private:
  int64_t kv_heads_ = 0, slots_ = 0;
  std::vector<int32_t> held_;  // [layer][kv_head][slot] block id, -1 empty
};

}  // namespace needle
