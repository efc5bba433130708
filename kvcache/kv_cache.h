// The KV cache: one contiguous arena per tensor kind (K, V) holding every layer, laid out as
//   [layer][kv_head][capacity][head_dim]  (elements of `dtype`),
// so one KV head's keys are a dense [tokens, head_dim] matrix that attention streams through.
// Memory is reserved with an anonymous mapping and committed by the OS as tokens are written,
// and the size is checked against the machine's available memory before anything is reserved.
// (The block-sparse issue replaces this with a block table over the same arena shape.)
#pragma once

#include <cstddef>
#include <cstdint>

#include "engine/base/dtype.h"

namespace needle {

struct KVCacheShape {
  int64_t layers = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t capacity = 0;  // tokens
  DType dtype = DType::kF32;

  size_t BytesPerToken() const {
    return static_cast<size_t>(2 * layers * kv_heads * head_dim) * DTypeSize(dtype);
  }
  size_t TotalBytes() const { return BytesPerToken() * static_cast<size_t>(capacity); }
};

// One layer's cache as the attention kernels read it.
struct KVLayerView {
  DType dtype;
  const void* k;        // [kv_heads][capacity][head_dim]
  const void* v;        // same layout
  int64_t head_stride;  // elements between consecutive KV heads (capacity * head_dim)
  int64_t head_dim;
};

class KVCache {
 public:
  // Throws Error naming the requested bytes and the available memory when it cannot fit.
  explicit KVCache(const KVCacheShape& shape);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const KVCacheShape& shape() const { return shape_; }
  int64_t size() const { return size_; }  // tokens written so far
  void Clear() { size_ = 0; }

  // Writes T tokens at positions [pos0, pos0 + T) of `layer` from f32 rows
  // k, v: [T, kv_heads, head_dim]; converts to the cache dtype. pos0 + T <= capacity.
  void Write(int64_t layer, int64_t pos0, int64_t T, const float* k, const float* v);
  // Marks tokens [0, n) as valid (after every layer of a step wrote them).
  void SetSize(int64_t n);

  KVLayerView Layer(int64_t layer) const;

 private:
  KVCacheShape shape_;
  int64_t size_ = 0;
  uint8_t* k_ = nullptr;
  uint8_t* v_ = nullptr;
  size_t bytes_each_ = 0;
};

// MemAvailable from /proc/meminfo in bytes (0 when unknown).
size_t AvailableMemoryBytes();

}  // namespace needle
