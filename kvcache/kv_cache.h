// The KV cache in host DRAM: per layer, K and V arenas of fixed-size blocks plus a block table.
//
//   arena (per layer, K and V alike): [slot][kv_head][block_size][head_dim]  elements of dtype
//   scales (int8 only):                [slot][kv_head][block_size][groups]    f32, groups of 32
//                                                                              channels (kKVGroup)
//   block table (per layer):           logical block b (tokens [b*B, (b+1)*B)) -> slot
//
// A block of one KV head is a dense [block_size, head_dim] matrix: appending a token writes one
// row, attention over a block streams it. Arenas are reserved from the maximum context with an
// anonymous mapping (committed by the OS as blocks are written); the bytes are checked against
// the memory budget (--kv-memory, else the machine's available memory) before anything is
// reserved, so an impossible context is an error naming both numbers, not an OOM kill.
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

// One layer's cache as the kernels read it.
struct KVLayerView {
  DType dtype;
  int64_t block_size, head_dim, kv_heads, groups;
  const uint8_t* k;  // arena, see above
  const uint8_t* v;
  const float* k_scale;  // int8 only
  const float* v_scale;
  const int32_t* table;  // logical block -> slot
  int64_t n_tokens;      // valid tokens (positions [0, n_tokens))
  int64_t slots;         // blocks the arenas hold ([slot] extent)

  size_t RowIndex(int64_t h, int64_t token) const {
    const int64_t slot = table[token / block_size];
    return static_cast<size_t>((slot * kv_heads + h) * block_size + token % block_size);
  }
  // Start of the row of `token` for KV head h; rows of one block are consecutive.
  const uint8_t* KRow(int64_t h, int64_t token) const {
    return k + RowIndex(h, token) * static_cast<size_t>(head_dim) * DTypeSize(dtype);
  }
  const uint8_t* VRow(int64_t h, int64_t token) const {
    return v + RowIndex(h, token) * static_cast<size_t>(head_dim) * DTypeSize(dtype);
  }
  const float* KScale(int64_t h, int64_t token) const {
    return k_scale == nullptr ? nullptr
                              : k_scale + RowIndex(h, token) * static_cast<size_t>(groups);
  }
  const float* VScale(int64_t h, int64_t token) const {
    return v_scale == nullptr ? nullptr
                              : v_scale + RowIndex(h, token) * static_cast<size_t>(groups);
  }
  // Scalar access (reference kernels, tests): element d of the key/value row, dequantised.
  float KAt(int64_t h, int64_t token, int64_t d) const {
    return At(KRow(h, token), KScale(h, token), d);
  }
  float VAt(int64_t h, int64_t token, int64_t d) const {
    return At(VRow(h, token), VScale(h, token), d);
  }

 private:
  float At(const uint8_t* row, const float* scale, int64_t d) const {
    if (dtype == DType::kI8)
      return static_cast<float>(reinterpret_cast<const int8_t*>(row)[d]) * scale[d / kKVGroup];
    return LoadAsF32(dtype, row, static_cast<size_t>(d));
  }
};

// Memory other than host DRAM for the arenas and block tables (the CUDA backend's device
// memory): the layout stays the same, so blocks move between memories without reshaping.
class KVMemory {
 public:
  virtual ~KVMemory() = default;
  virtual std::string Name() const = 0;  // for messages: "GPU 0 (NVIDIA H100) memory"
  virtual size_t AvailableBytes() const = 0;
  virtual void* Allocate(size_t bytes) = 0;  // throws Error naming the bytes asked and free
  virtual void Deallocate(void* p) = 0;
  virtual void CopyFromHost(void* dst, const void* src, size_t bytes) = 0;
};

class KVCache {
 public:
  // memory_limit: bytes the cache may take (0: the memory's available bytes). Throws Error
  // naming the requested and the allowed bytes when the context does not fit. memory: where the
  // arenas live (nullptr: host DRAM); caches elsewhere are written by the backend (KVWrite).
  explicit KVCache(const KVCacheShape& shape, size_t memory_limit = 0, KVMemory* memory = nullptr);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const KVCacheShape& shape() const { return shape_; }
  // Unique per cache constructed in this process (a later cache may reuse a freed one's
  // addresses, never its id): what recorded work that holds the cache's pointers is keyed by.
  uint64_t id() const { return id_; }
  int64_t size() const { return size_; }  // tokens valid in every layer
  void Clear();

  // Writes T tokens at positions [pos0, pos0 + T) of `layer` from f32 rows
  // k, v: [T, kv_heads, head_dim], converting (int8: quantising per group) to the cache type.
  // Host caches only.
  void Write(int64_t layer, int64_t pos0, int64_t T, const float* k, const float* v);
  // Assigns slots to the blocks of positions [pos0, pos0 + T) of `layer` (and updates the
  // table's copy in the cache's memory); the step before any write, host or device.
  void AssignBlocks(int64_t layer, int64_t pos0, int64_t T);
  bool on_host() const { return memory_ == nullptr; }
  // Marks tokens [0, n) valid (after every layer of a step wrote them); n may also shrink.
  void SetSize(int64_t n);

  // Pointers into the cache's memory (device pointers for a device cache, table included).
  KVLayerView Layer(int64_t layer) const;
  // The slot logical block b of `layer` occupies (-1: unassigned or evicted from a ring).
  int32_t SlotOf(int64_t layer, int64_t b) const { return table_[layer][b]; }
  // The K (values == false) or V data of one slot of `layer`: [kv_heads][block_size][head_dim]
  // elements, in the cache's memory (for copies between caches; not int8 scales).
  uint8_t* BlockData(int64_t layer, bool values, int64_t slot) const;
  size_t BlockBytes() const { return block_bytes_; }

 private:
  struct Arena {
    uint8_t* p = nullptr;
    size_t bytes = 0;
  };
  Arena Reserve(size_t bytes);
  void Release(Arena& a);

  KVCacheShape shape_;
  uint64_t id_;
  KVMemory* memory_ = nullptr;
  int32_t* table_mirror_ = nullptr;  // [layer][block] in memory_ (device caches)
  int64_t size_ = 0;
  size_t block_bytes_ = 0, block_scale_floats_ = 0;  // one slot of one layer, K (or V) alone
  std::vector<int64_t> slot0_;                       // [layer]: its first slot in the arenas
  Arena k_, v_, ks_, vs_;
  std::vector<std::vector<int32_t>> table_;  // [layer][logical block] -> slot, -1 = unassigned
  std::vector<int32_t> next_slot_;           // per layer
};

// MemAvailable from /proc/meminfo in bytes (0 when unknown).
size_t AvailableMemoryBytes();
// "1.5 GiB" and the like.
std::string FormatBytes(size_t n);
// Parses a byte count with an optional K/M/G/T suffix (powers of 1024); throws naming `what`.
size_t ParseByteSize(const std::string& s, const std::string& what);

}  // namespace needle
