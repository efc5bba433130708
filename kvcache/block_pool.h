// The blocks of KV memory that caches draw from (vLLM's block manager, the physical side): per
// layer, K and V arenas of fixed-size slots (KVCacheShape's layout, scales included), a free list
// and a reference count per slot. A KVCache (kv_cache.h) is one sequence's view: its block
// tables map its logical blocks to slots of a pool, its own (a cache made from a shape) or one
// shared by several sequences (KVCache(BlockPool&, capacity)), so that sequences take memory
// as they grow and give it back when they end. Bookkeeping only: writes and copies of the
// slots' contents are the caches' and backends'.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <queue>
#include <vector>

#include "kvcache/kv_cache_shape.h"

namespace needle {

class KVMemory;

class BlockPool {
 public:
  // shape: the slots per layer (KVCacheShape::LayerSlots, from its capacity in tokens), in host
  // memory (memory == nullptr) or in `memory`. memory_limit: bytes the pool may take (0: the
  // memory's available bytes). Throws Error naming the requested and the allowed bytes when it
  // does not fit.
  explicit BlockPool(const KVCacheShape& shape, size_t memory_limit = 0,
                     KVMemory* memory = nullptr);
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  const KVCacheShape& shape() const { return shape_; }
  KVMemory* memory() const { return memory_; }
  int64_t slots(int64_t layer) const { return shape_.LayerSlots(layer); }

  // A free slot of `layer` (the lowest), its reference count 1; throws Error (naming the layer
  // and the pool's size) when none is left. Not for ring layers (their slots are fixed).
  int32_t Allocate(int64_t layer);
  // One more reference to a slot in use (a block shared by sequences).
  void Share(int64_t layer, int32_t slot);
  // One reference fewer; the slot is free again at zero.
  void Free(int64_t layer, int32_t slot);
  int32_t References(int64_t layer, int32_t slot) const;
  // Slots of `layer` not in use.
  int64_t FreeSlots(int64_t layer) const;

  // The K (values == false) or V data of one slot: [kv_heads][block_size][head_dim] elements,
  // in the pool's memory; scales [kv_heads][block_size][groups] floats (int8 only, else null).
  uint8_t* BlockData(int64_t layer, bool values, int64_t slot) const;
  float* ScaleData(int64_t layer, bool values, int64_t slot) const;
  size_t BlockBytes() const { return block_bytes_; }
  size_t BlockScaleBytes() const { return block_scale_floats_ * sizeof(float); }  // (int8 only)

 private:
  struct Arena {
    uint8_t* p = nullptr;
    size_t bytes = 0;
  };
  Arena Reserve(size_t bytes);
  void Release(Arena& a);

  KVCacheShape shape_;
  KVMemory* memory_ = nullptr;
  size_t block_bytes_ = 0, block_scale_floats_ = 0;  // one slot of one layer, K (or V) alone
  std::vector<int64_t> slot0_;                       // [layer]: its first slot in the arenas
  Arena k_, v_, ks_, vs_;
  // [layer]: slots below next_ were handed out at some time; freed_ holds those free again
  // (lowest first); refs_ [layer][slot < next_].
  std::vector<int32_t> next_;
  std::vector<std::priority_queue<int32_t, std::vector<int32_t>, std::greater<int32_t>>> freed_;
  std::vector<std::vector<int32_t>> refs_;
};

}  // namespace needle
