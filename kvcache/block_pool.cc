#include "kvcache/block_pool.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "engine/base/error.h"
#include "kvcache/kv_cache.h"

namespace needle {

BlockPool::Arena BlockPool::Reserve(size_t bytes) {
  Arena a;
  a.bytes = std::max<size_t>(bytes, 1);
  if (memory_ != nullptr) {
    a.p = static_cast<uint8_t*>(memory_->Allocate(a.bytes));
    return a;
  }
  void* m = ::mmap(nullptr, a.bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED)
    Fail("KV cache: cannot reserve ", a.bytes >> 20, " MiB: ", std::strerror(errno));
  a.p = static_cast<uint8_t*>(m);
  // Huge pages where the kernel allows them: attention jumps between blocks all over the
  // arena, and 4 KiB pages would cost a TLB miss every few rows.
  ::madvise(m, a.bytes, MADV_HUGEPAGE);
  return a;
}

void BlockPool::Release(Arena& a) {
  if (a.p == nullptr) return;
  if (memory_ != nullptr)
    memory_->Deallocate(a.p);
  else
    ::munmap(a.p, a.bytes);
  a.p = nullptr;
}

BlockPool::BlockPool(const KVCacheShape& s, size_t memory_limit, KVMemory* memory)
    : shape_(s), memory_(memory) {
  if (s.layers <= 0 || s.kv_heads <= 0 || s.head_dim <= 0 || s.capacity <= 0 || s.block_size <= 0)
    Fail("KV cache: invalid shape (layers ", s.layers, ", kv_heads ", s.kv_heads, ", head_dim ",
         s.head_dim, ", tokens ", s.capacity, ", block_size ", s.block_size, ")");
  if (!IsFloatWeightType(s.dtype) && s.dtype != DType::kI8)
    Fail("KV cache: type must be f32, f16, bf16 or int8");
  // Bounds before any product: positions below 2^31 (the GPU kernels index them in 32 bits),
  // block size and the per-token shape within what the config bounds allow, so that the byte
  // counts below cannot wrap (a context of INT64_MAX once did).
  if (s.capacity > (int64_t{1} << 31) - 1)
    Fail("KV cache: ", s.capacity, " tokens is above needle's limit of 2^31 - 1 positions");
  if (s.block_size > (int64_t{1} << 20) || s.layers > 4096 || s.kv_heads > 4096 ||
      s.head_dim > 4096)
    Fail("KV cache: shape out of range (layers ", s.layers, ", kv_heads ", s.kv_heads,
         ", head_dim ", s.head_dim, ", block_size ", s.block_size, ")");
  if (!s.ring_layer.empty()) {
    if (static_cast<int64_t>(s.ring_layer.size()) != s.layers)
      Fail("KV cache: ring_layer has ", s.ring_layer.size(), " entries for ", s.layers, " layers");
    if (s.pinned_blocks < 0 || s.ring_blocks <= 0 || s.pinned_blocks > (int64_t{1} << 31) ||
        s.ring_blocks > (int64_t{1} << 31) || s.extra_blocks < 0 ||
        s.extra_blocks > (int64_t{1} << 20))
      Fail("KV cache: ring of ", s.pinned_blocks, " pinned + ", s.ring_blocks, " + ",
           s.extra_blocks, " extra blocks is invalid");
  }
  const long double need = static_cast<long double>(s.BytesPerToken()) *
                           static_cast<long double>(s.num_blocks()) *
                           static_cast<long double>(s.block_size);
  if (need > 0x1p62L)
    Fail("KV cache for ", s.capacity, " tokens needs more than 2^62 bytes (", s.BytesPerToken(),
         " bytes per token): use a shorter context");
  const size_t total = s.TotalBytes();
  const size_t avail = memory != nullptr ? memory->AvailableBytes() : AvailableMemoryBytes();
  const std::string where = memory != nullptr ? memory->Name() : std::string("memory");
  const size_t limit = memory_limit != 0 ? memory_limit : avail;
  if (limit != 0 && total > limit)
    Fail("KV cache for ", s.capacity, " tokens needs ", FormatBytes(total), " (", s.BytesPerToken(),
         " bytes per token, ", KVTypeName(s.dtype), ") but ",
         memory_limit != 0 ? "--kv-memory allows " + FormatBytes(limit)
                           : "only " + FormatBytes(limit) + " of " + where + " is available",
         "; use a shorter context, a smaller --kv-type or a larger --kv-memory");
  if (memory_limit != 0 && avail != 0 && total > avail)
    Fail("KV cache for ", s.capacity, " tokens needs ", FormatBytes(total), " but only ",
         FormatBytes(avail), " of ", where, " is available");
  block_bytes_ = static_cast<size_t>(s.kv_heads * s.block_size * s.head_dim) * DTypeSize(s.dtype);
  block_scale_floats_ = static_cast<size_t>(s.kv_heads * s.block_size * s.groups());
  slot0_.resize(static_cast<size_t>(s.layers));
  int64_t slots = 0;
  for (int64_t l = 0; l < s.layers; ++l) slot0_[l] = slots, slots += s.LayerSlots(l);
  k_ = Reserve(block_bytes_ * static_cast<size_t>(slots));
  v_ = Reserve(block_bytes_ * static_cast<size_t>(slots));
  if (s.dtype == DType::kI8) {
    ks_ = Reserve(block_scale_floats_ * sizeof(float) * static_cast<size_t>(slots));
    vs_ = Reserve(block_scale_floats_ * sizeof(float) * static_cast<size_t>(slots));
  }
  next_.assign(static_cast<size_t>(s.layers), 0);
  freed_.resize(static_cast<size_t>(s.layers));
  refs_.resize(static_cast<size_t>(s.layers));
}

BlockPool::~BlockPool() {
  for (Arena* a : {&k_, &v_, &ks_, &vs_}) Release(*a);
}

int32_t BlockPool::Allocate(int64_t layer) {
  NEEDLE_CHECK(layer >= 0 && layer < shape_.layers && !shape_.IsRing(layer));
  const auto l = static_cast<size_t>(layer);
  int32_t slot;
  if (!freed_[l].empty()) {
    slot = freed_[l].top();
    freed_[l].pop();
  } else {
    if (next_[l] >= slots(layer))
      Fail("KV cache: no free block in layer ", layer, ": all ", slots(layer), " blocks of ",
           shape_.block_size, " tokens (", shape_.capacity,
           " tokens in all) are in use; give the pool more memory or run fewer sequences at once");
    slot = next_[l]++;
    refs_[l].push_back(0);
  }
  refs_[l][static_cast<size_t>(slot)] = 1;
  return slot;
}

void BlockPool::Share(int64_t layer, int32_t slot) {
  NEEDLE_CHECK(References(layer, slot) > 0);
  ++refs_[static_cast<size_t>(layer)][static_cast<size_t>(slot)];
}

void BlockPool::Free(int64_t layer, int32_t slot) {
  NEEDLE_CHECK(References(layer, slot) > 0);
  const auto l = static_cast<size_t>(layer);
  if (--refs_[l][static_cast<size_t>(slot)] > 0) return;
  freed_[l].push(slot);
  if (static_cast<int64_t>(freed_[l].size()) == next_[l]) {  // every slot free: start over
    freed_[l] = {};
    next_[l] = 0;
    refs_[l].clear();
  }
}

int32_t BlockPool::References(int64_t layer, int32_t slot) const {
  NEEDLE_CHECK(layer >= 0 && layer < shape_.layers);
  const auto& r = refs_[static_cast<size_t>(layer)];
  return slot >= 0 && static_cast<size_t>(slot) < r.size() ? r[static_cast<size_t>(slot)] : 0;
}

int64_t BlockPool::FreeSlots(int64_t layer) const {
  const auto l = static_cast<size_t>(layer);
  return slots(layer) - next_[l] + static_cast<int64_t>(freed_[l].size());
}

uint8_t* BlockPool::BlockData(int64_t layer, bool values, int64_t slot) const {
  NEEDLE_CHECK(layer >= 0 && layer < shape_.layers && slot >= 0 && slot < slots(layer));
  return (values ? v_.p : k_.p) + static_cast<size_t>(slot0_[layer] + slot) * block_bytes_;
}

float* BlockPool::ScaleData(int64_t layer, bool values, int64_t slot) const {
  const Arena& a = values ? vs_ : ks_;
  if (a.p == nullptr) return nullptr;
  return reinterpret_cast<float*>(a.p) +
         (slot0_[layer] + slot) * static_cast<int64_t>(block_scale_floats_);
}

}  // namespace needle
