// The shape of a KV cache's (and a block pool's) memory: layers, heads, blocks, rings; the
// layout is kv_cache.h's.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/base/dtype.h"

namespace needle {

constexpr int64_t kKVGroup = 32;  // int8: one f32 scale per 32 channels of one token's row

// KV storage types: f32, f16, bf16, int8 ("int8"/"i8"). Throws naming `what` otherwise.
DType ParseKVType(const std::string& s, const std::string& what);
const char* KVTypeName(DType t);

struct KVCacheShape {
  KVCacheShape() = default;
  KVCacheShape(int64_t layers_, int64_t kv_heads_, int64_t head_dim_, int64_t capacity_,
               int64_t block_size_ = 128, DType dtype_ = DType::kF32)
      : layers(layers_),
        kv_heads(kv_heads_),
        head_dim(head_dim_),
        capacity(capacity_),
        block_size(block_size_),
        dtype(dtype_) {}

  int64_t layers = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t capacity = 0;  // tokens (rounded up to whole blocks when allocated)
  int64_t block_size = 128;
  DType dtype = DType::kF32;

  // Ring layers (the hybrid engine's GPU copy of a sparse layer: Initial + Local only). Such a
  // layer has pinned_blocks + ring_blocks slots: block b < pinned_blocks keeps slot b; a later
  // block b takes slot pinned_blocks + (b - pinned_blocks) % ring_blocks and evicts the block
  // that held it (its table entry becomes -1). ring_layer: [layers] or empty (no ring layers).
  std::vector<uint8_t> ring_layer;
  int64_t pinned_blocks = 0, ring_blocks = 0;
  // Ring layers only: slots after the ring that no logical block maps to (the hybrid engine
  // gathers Context blocks from the host into them for the GPU to attend). ExtraSlot(l, j).
  int64_t extra_blocks = 0;

  int64_t groups() const { return dtype == DType::kI8 ? (head_dim + kKVGroup - 1) / kKVGroup : 0; }
  int64_t num_blocks() const { return (capacity + block_size - 1) / block_size; }
  bool IsRing(int64_t layer) const {
    return !ring_layer.empty() && ring_layer[static_cast<size_t>(layer)] != 0;
  }
  // Blocks the arenas of `layer` hold.
  int64_t LayerSlots(int64_t layer) const {
    return IsRing(layer) ? std::min(num_blocks(), pinned_blocks + ring_blocks) + extra_blocks
                         : num_blocks();
  }
  // Extra slot j (< extra_blocks) of a ring layer.
  int64_t ExtraSlot(int64_t layer, int64_t j) const { return LayerSlots(layer) - extra_blocks + j; }
  // The slot logical block b of a ring layer occupies.
  int64_t RingSlot(int64_t b) const {
    return b < pinned_blocks ? b : pinned_blocks + (b - pinned_blocks) % ring_blocks;
  }
  // K + V bytes of one slot (a block of every KV head) of one layer, scales included.
  size_t SlotBytes() const {
    return static_cast<size_t>(2 * kv_heads * block_size) *
           (static_cast<size_t>(head_dim) * DTypeSize(dtype) +
            static_cast<size_t>(groups()) * sizeof(float));
  }
  int64_t TotalSlots() const {
    int64_t n = 0;
    for (int64_t l = 0; l < layers; ++l) n += LayerSlots(l);
    return n;
  }
  // K + V bytes of one token in every layer, scales included.
  size_t BytesPerToken() const {
    return static_cast<size_t>(2 * layers * kv_heads) *
           (static_cast<size_t>(head_dim) * DTypeSize(dtype) +
            static_cast<size_t>(groups()) * sizeof(float));
  }
  size_t TotalBytes() const { return SlotBytes() * static_cast<size_t>(TotalSlots()); }
};

}  // namespace needle
