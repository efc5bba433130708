// Which Context blocks the hybrid engine's GPU holds, per sparse layer and KV head, in the
// layer's extra ring slots (KVCacheShape::extra_blocks), and what one step must copy there.
//
// The GPU attends n_g of each KV head's selected Context blocks (SparseConfig::gpu_share). They
// stay in the slots after the step: a block selected again at a later step (retention keeps
// retain_blocks of them, and consecutive queries select much the same blocks) is attended where it
// lies, so only blocks new to the GPU cross PCIe. A layer may have more slots than one step's
// share (SparseConfig::gpu_cache_blocks): blocks the GPU attended earlier stay until their slot is
// the least recently attended one that a new block needs. Plain bookkeeping, no CUDA: the hybrid
// turns the copies into one cuda::GatherBlocks call.
//
// Slot j of head h means head h's part of extra slot j (the slot holds every KV head's block,
// [kv_head][block_size][head_dim], but each head's may come from another block). The GPU attends
// each head's n_g blocks through a block table per head (KVLayerView::table_head_stride): head
// h's ViewSlot(layer, h, j), j < n_g, wherever they lie.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace needle {

class ResidentBlocks {
 public:
  // A head block to copy from the host cache into slot `to` of `head`.
  struct Copy {
    int32_t block = 0;
    int32_t head = 0;
    int32_t to = 0;
    int32_t evicted = -1;  // the block the slot held before (-1: empty)
  };

  ResidentBlocks() = default;
  ResidentBlocks(int64_t layers, int64_t kv_heads, int64_t slots);

  void Clear();  // every slot empty (a new sequence or prompt)

  // One step of `layer`: of each KV head h's selection blocks[h] (any order, distinct), the GPU
  // attends n (returned), taken in this order: those in retained[h] (they are likely to be
  // selected again), then the rest in blocks[h]'s order; first those it holds in any slot, then
  // blocks new to it, each read from the host into an empty slot or else into the one attended
  // least recently (never one this step attends). n is n_g (<= slots, <= every blocks[h].size()),
  // or more where every head holds more of its selected blocks: the fewest any head holds, up to
  // n_max (and the slots, and the shortest list); those cost no copy. take_rest > 0: every
  // selected block (n = the lists' length) where the lists are equally long, within n_max, and
  // no head holds fewer than all but take_rest of its own (each copies at most take_rest): the
  // CPU would be left so few that it costs more than the GPU's copies. n_g 0: none. Afterwards
  // head h attends ViewSlot(layer, h, j) for j < n, which holds ViewBlock(layer, h, j).
  // `copies`: what the step must copy (every `to` distinct).
  int64_t Place(int64_t layer, const std::vector<std::vector<int32_t>>& blocks,
                const std::vector<std::vector<int32_t>>& retained, int64_t n_g,
                std::vector<Copy>* copies, int64_t n_max = 0, int64_t take_rest = 0);

  // One step of `layer` planned on the GPU (the device plan of host placement): of each KV head
  // h's selection blocks[h], the GPU attends those it holds, where they lie, and nothing is
  // copied for the step. Marks their slots attended at this step (the least recently attended
  // are taken first; Fill takes none of them) and returns how many each head attends (valid
  // until the next call).
  const std::vector<int64_t>& Attend(int64_t layer,
                                     const std::vector<std::vector<int32_t>>& blocks);

  // After Place (or Attend) at the same step of `layer`: of each KV head h's blocks[h] (selected
  // blocks the CPU attends at this step), those the GPU does not hold, up to `most` a head, in
  // order, each into a slot this step does not attend and that holds none of blocks[h] (an empty
  // one, else the one attended or filled least recently), for later steps to attend where they lie.
  // `copies`: what to copy.
  void Fill(int64_t layer, const std::vector<std::vector<int32_t>>& blocks, int64_t most,
            std::vector<Copy>* copies);

  int32_t At(int64_t layer, int64_t head, int64_t slot) const {  // -1: empty
    return held_[Index(layer, head, slot)];
  }
  // The j-th block head h attends at the step Place last planned for `layer`, and its slot.
  int32_t ViewSlot(int64_t layer, int64_t head, int64_t j) const {
    return view_[Index(layer, head, j)];
  }
  int32_t ViewBlock(int64_t layer, int64_t head, int64_t j) const {
    return At(layer, head, ViewSlot(layer, head, j));
  }
  int64_t slots() const { return slots_; }

 private:
  // Of one head's slots (held, used: its rows), one that taken_ leaves: an empty one, else the
  // one attended least recently; -1: none.
  int64_t SlotToTake(const int32_t* held, const int64_t* used) const;
  size_t Index(int64_t layer, int64_t head, int64_t slot) const {
    return static_cast<size_t>((layer * kv_heads_ + head) * slots_ + slot);
  }
  // The slot of `head` that holds `block`, -1: none (where_).
  int32_t SlotOf(int64_t layer, int64_t head, int32_t block) const {
    return block >= 0 && block < blocks_
               ? where_[static_cast<size_t>((layer * kv_heads_ + head) * blocks_ + block)]
               : -1;
  }
  // held_[layer][head][slot] = block (-1: empty), where_ kept in step.
  void Hold(int64_t layer, int64_t head, int64_t slot, int32_t block);
  int64_t layers_ = 0, kv_heads_ = 0, slots_ = 0;
  std::vector<int32_t> held_;  // [layer][kv_head][slot] block id, -1 empty
  // [layer][kv_head][block] the slot holding it, -1 none: a block's slot without a search of the
  // slots (at 160 slots a layer the searches took Fill 44 us a layer, Attend 4, a dev core).
  // blocks_: the ids it covers, grown (doubled) when a larger one is held.
  std::vector<int32_t> where_;
  int64_t blocks_ = 0;
  std::vector<uint64_t> cand_;     // (Fill's scratch: the slots it may take, as ordering keys)
  std::vector<int64_t> attended_;  // (Attend's result: kept, not allocated a call)
  std::vector<int64_t> used_;      // [layer][kv_head][slot] the Place call that last attended it
  std::vector<int32_t> view_;      // [layer][kv_head][slot] the last step's slots, n_g of them
  std::vector<int64_t> calls_;     // [layer] Place calls so far
  // (Place's scratch, per KV head: blocks in order, their slots, how many are held.)
  std::vector<std::vector<int32_t>> order_, slot_of_;
  std::vector<int64_t> held_n_;
  std::vector<char> taken_;
};

}  // namespace needle
