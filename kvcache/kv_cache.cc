#include "kvcache/kv_cache.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>

#include "engine/base/error.h"

namespace needle {

size_t AvailableMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

KVCache::KVCache(const KVCacheShape& s) : shape_(s) {
  if (s.layers <= 0 || s.kv_heads <= 0 || s.head_dim <= 0 || s.capacity <= 0)
    Fail("KV cache: invalid shape (layers ", s.layers, ", kv_heads ", s.kv_heads, ", head_dim ",
         s.head_dim, ", tokens ", s.capacity, ")");
  if (!IsFloatWeightType(s.dtype)) Fail("KV cache: type must be f32, f16 or bf16");
  bytes_each_ = s.TotalBytes() / 2;
  const size_t avail = AvailableMemoryBytes();
  if (avail != 0 && s.TotalBytes() > avail)
    Fail("KV cache for ", s.capacity, " tokens needs ", s.TotalBytes() / (1 << 20), " MiB (",
         s.BytesPerToken(), " bytes per token, ", DTypeName(s.dtype), ") but only ",
         avail / (1 << 20),
         " MiB of memory is available; use a shorter context or a smaller KV type");
  for (uint8_t** p : {&k_, &v_}) {
    void* m = ::mmap(nullptr, bytes_each_, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED)
      Fail("KV cache: cannot reserve ", bytes_each_ / (1 << 20), " MiB: ", std::strerror(errno));
    *p = static_cast<uint8_t*>(m);
  }
}

KVCache::~KVCache() {
  if (k_ != nullptr) ::munmap(k_, bytes_each_);
  if (v_ != nullptr) ::munmap(v_, bytes_each_);
}

KVLayerView KVCache::Layer(int64_t layer) const {
  const size_t layer_bytes =
      static_cast<size_t>(shape_.kv_heads * shape_.capacity * shape_.head_dim) *
      DTypeSize(shape_.dtype);
  return KVLayerView{shape_.dtype, k_ + layer * layer_bytes, v_ + layer * layer_bytes,
                     shape_.capacity * shape_.head_dim, shape_.head_dim};
}

void KVCache::Write(int64_t layer, int64_t pos0, int64_t T, const float* k, const float* v) {
  if (pos0 < 0 || pos0 + T > shape_.capacity)
    Fail("KV cache: writing positions [", pos0, ", ", pos0 + T, ") exceeds the capacity of ",
         shape_.capacity, " tokens");
  const KVLayerView view = Layer(layer);
  const int64_t D = shape_.head_dim, Hk = shape_.kv_heads;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < Hk; ++h) {
      const size_t dst = static_cast<size_t>(h * view.head_stride + (pos0 + t) * D);
      const float* ks = k + (t * Hk + h) * D;
      const float* vs = v + (t * Hk + h) * D;
      if (shape_.dtype == DType::kF32) {
        std::memcpy(static_cast<float*>(const_cast<void*>(view.k)) + dst, ks, D * sizeof(float));
        std::memcpy(static_cast<float*>(const_cast<void*>(view.v)) + dst, vs, D * sizeof(float));
      } else {
        for (int64_t d = 0; d < D; ++d) {
          StoreFromF32(shape_.dtype, const_cast<void*>(view.k), dst + d, ks[d]);
          StoreFromF32(shape_.dtype, const_cast<void*>(view.v), dst + d, vs[d]);
        }
      }
    }
  }
}

void KVCache::SetSize(int64_t n) {
  NEEDLE_CHECK(n >= 0 && n <= shape_.capacity);
  size_ = n;
}

}  // namespace needle
