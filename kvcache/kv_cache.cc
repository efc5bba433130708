#include "kvcache/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "engine/base/error.h"

namespace needle {

DType ParseKVType(const std::string& s, const std::string& what) {
  if (s == "int8" || s == "i8" || s == "q8") return DType::kI8;
  if (s == "f32" || s == "float32") return DType::kF32;
  if (s == "f16" || s == "float16" || s == "fp16") return DType::kF16;
  if (s == "bf16" || s == "bfloat16") return DType::kBF16;
  Fail(what, ": unknown KV cache type '", s, "' (expected f32, f16, bf16 or int8)");
}

const char* KVTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kI8:
      return "int8";
    default:
      return "?";
  }
}

size_t AvailableMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

size_t ParseByteSize(const std::string& s, const std::string& what) {
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (...) {
    pos = 0;
  }
  if (s.empty() || pos == 0 || !std::isfinite(v) || v < 0)
    Fail(what, ": '", s, "' is not a size (examples: 512M, 16G)");
  std::string suf = s.substr(pos);
  double mul = 1;
  if (suf == "" || suf == "B")
    mul = 1;
  else if (suf == "K" || suf == "KiB" || suf == "k")
    mul = 1024.0;
  else if (suf == "M" || suf == "MiB")
    mul = 1024.0 * 1024;
  else if (suf == "G" || suf == "GiB")
    mul = 1024.0 * 1024 * 1024;
  else if (suf == "T" || suf == "TiB")
    mul = 1024.0 * 1024 * 1024 * 1024;
  else
    Fail(what, ": unknown size suffix '", suf, "' in '", s, "' (use K, M, G or T)");
  if (v * mul >= 0x1p63) Fail(what, ": '", s, "' is larger than any memory (2^63 bytes)");
  return static_cast<size_t>(v * mul);
}

std::string FormatBytes(size_t n) {
  char buf[64];
  if (n < (size_t{1} << 10))
    std::snprintf(buf, sizeof buf, "%zu B", n);
  else if (n < (size_t{1} << 20))
    std::snprintf(buf, sizeof buf, "%.1f KiB", n / 1024.0);
  else if (n < (size_t{1} << 30))
    std::snprintf(buf, sizeof buf, "%.1f MiB", n / 1048576.0);
  else
    std::snprintf(buf, sizeof buf, "%.2f GiB", n / 1073741824.0);
  return buf;
}

static uint64_t NextCacheId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

KVCache::KVCache(const KVCacheShape& s, size_t memory_limit, KVMemory* memory)
    : own_(std::make_unique<BlockPool>(s, memory_limit, memory)),
      pool_(own_.get()),
      shape_(s),
      id_(NextCacheId()),
      memory_(memory) {
  InitTables();
}

KVCache::KVCache(BlockPool& pool, int64_t capacity)
    : pool_(&pool), shape_(pool.shape()), id_(NextCacheId()), memory_(pool.memory()) {
  if (!shape_.ring_layer.empty())
    Fail("KV cache: a pool with ring layers (the hybrid engine's) serves one cache only");
  if (capacity <= 0 || capacity > (int64_t{1} << 31) - 1)
    Fail("KV cache: a sequence of ", capacity, " tokens (expected 1 to 2^31 - 1)");
  shape_.capacity = capacity;
  InitTables();
}

void KVCache::InitTables() {
  const int64_t nb = shape_.num_blocks(), L = shape_.layers;
  table_.assign(static_cast<size_t>(L), std::vector<int32_t>(static_cast<size_t>(nb), -1));
  if (memory_ != nullptr) {
    const size_t bytes = static_cast<size_t>(L * nb) * sizeof(int32_t);
    table_mirror_ = static_cast<int32_t*>(memory_->Allocate(bytes));
    std::vector<int32_t> unassigned(static_cast<size_t>(L * nb), -1);
    memory_->CopyFromHost(table_mirror_, unassigned.data(), bytes);
  }
}

KVCache::~KVCache() {
  if (own_ == nullptr) FreeBlocks();
  if (table_mirror_ != nullptr) memory_->Deallocate(table_mirror_);
}

void KVCache::FreeBlocks() {
  for (int64_t l = 0; l < shape_.layers; ++l) {
    if (shape_.IsRing(l)) continue;
    for (int32_t& slot : table_[l])
      if (slot >= 0) pool_->Free(l, slot), slot = -1;
  }
}

void KVCache::Clear() {
  size_ = 0;
  swapped_ = false;
  FreeBlocks();
  for (auto& t : table_) std::fill(t.begin(), t.end(), -1);
  if (table_mirror_ != nullptr)
    for (int64_t l = 0; l < shape_.layers; ++l)
      memory_->CopyFromHost(table_mirror_ + l * shape_.num_blocks(), table_[l].data(),
                            table_[l].size() * sizeof(int32_t));
}

void KVCache::AssignBlocks(int64_t layer, int64_t pos0, int64_t T) {
  const KVCacheShape& s = shape_;
  if (layer < 0 || layer >= s.layers) Fail("KV cache: layer ", layer, " out of range");
  if (pos0 < 0 || T < 0 || pos0 + T > s.num_blocks() * s.block_size)
    Fail("KV cache: writing positions [", pos0, ", ", pos0 + T, ") exceeds the capacity of ",
         s.capacity, " tokens");
  if (T == 0) return;
  if (swapped_) Fail("KV cache: written while swapped out");
  const int64_t b0 = pos0 / s.block_size, b1 = (pos0 + T - 1) / s.block_size;
  std::vector<int32_t>& table = table_[layer];
  const bool ring = s.IsRing(layer);
  if (ring && b1 - std::max(b0, s.pinned_blocks) >= s.ring_blocks)
    Fail("KV cache: writing positions [", pos0, ", ", pos0 + T, ") at once overflows the ring of ",
         s.ring_blocks, " blocks of layer ", layer);
  int64_t lo = b1 + 1, hi = -1;  // the table entries that changed
  for (int64_t b = b0; b <= b1; ++b) {
    if (table[b] >= 0) continue;
    if (!ring) {
      table[b] = pool_->Allocate(layer);
      lo = std::min(lo, b), hi = std::max(hi, b);
      continue;
    }
    const int64_t slot = s.RingSlot(b);
    // Evict whichever block holds the slot now (the one ring_blocks before b, if any).
    for (int64_t old = b - s.ring_blocks; old >= s.pinned_blocks; old -= s.ring_blocks)
      if (table[old] == slot) {
        table[old] = -1;
        lo = std::min(lo, old), hi = std::max(hi, old);
        break;
      }
    table[b] = static_cast<int32_t>(slot);
    lo = std::min(lo, b), hi = std::max(hi, b);
  }
  if (hi >= lo && table_mirror_ != nullptr)
    memory_->CopyFromHost(table_mirror_ + layer * s.num_blocks() + lo, &table[lo],
                          static_cast<size_t>(hi - lo + 1) * sizeof(int32_t));
}

KVLayerView KVCache::Layer(int64_t layer) const {
  const KVCacheShape& s = shape_;
  return KVLayerView{
      s.dtype,
      s.block_size,
      s.head_dim,
      s.kv_heads,
      s.groups(),
      pool_->BlockData(layer, false, 0),
      pool_->BlockData(layer, true, 0),
      pool_->ScaleData(layer, false, 0),
      pool_->ScaleData(layer, true, 0),
      table_mirror_ != nullptr ? table_mirror_ + layer * s.num_blocks() : table_[layer].data(),
      size_,
      pool_->slots(layer)};
}

namespace {
// Symmetric int8 per group of kKVGroup channels: scale = max|x| / 127.
void QuantizeRow(const float* x, int64_t D, int8_t* q, float* scales) {
  for (int64_t g0 = 0, gi = 0; g0 < D; g0 += kKVGroup, ++gi) {
    const int64_t g1 = std::min(D, g0 + kKVGroup);
    float amax = 0;
    for (int64_t d = g0; d < g1; ++d) amax = std::max(amax, std::fabs(x[d]));
    const float scale = amax / 127.0f;
    const float inv = scale > 0 ? 1.0f / scale : 0.0f;
    scales[gi] = scale;
    for (int64_t d = g0; d < g1; ++d)
      q[d] = static_cast<int8_t>(std::clamp(std::nearbyint(x[d] * inv), -127.0f, 127.0f));
  }
}
}  // namespace

void KVCache::Write(int64_t layer, int64_t pos0, int64_t T, const float* k, const float* v) {
  const KVCacheShape& s = shape_;
  if (memory_ != nullptr)
    Fail("KV cache in ", memory_->Name(), ": written by its backend, not from the host");
  AssignBlocks(layer, pos0, T);
  const KVLayerView view = Layer(layer);
  const int64_t D = s.head_dim, Hk = s.kv_heads;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < Hk; ++h) {
      const float* src[2] = {k + (t * Hk + h) * D, v + (t * Hk + h) * D};
      uint8_t* dst[2] = {const_cast<uint8_t*>(view.KRow(h, pos0 + t)),
                         const_cast<uint8_t*>(view.VRow(h, pos0 + t))};
      for (int kv = 0; kv < 2; ++kv) {
        if (s.dtype == DType::kF32) {
          std::memcpy(dst[kv], src[kv], D * sizeof(float));
        } else if (s.dtype == DType::kI8) {
          float* sc =
              const_cast<float*>(kv == 0 ? view.KScale(h, pos0 + t) : view.VScale(h, pos0 + t));
          QuantizeRow(src[kv], D, reinterpret_cast<int8_t*>(dst[kv]), sc);
        } else {
          for (int64_t d = 0; d < D; ++d) StoreFromF32(s.dtype, dst[kv], d, src[kv][d]);
        }
      }
    }
  }
}

void KVCache::SharePrefix(const KVCache& from, int64_t tokens) {
  const KVCacheShape& s = shape_;
  if (from.pool_ != pool_) Fail("KV cache: a prefix is shared only within one block pool");
  if (size_ != 0)
    Fail("KV cache: a prefix is shared into an empty cache, not one of ", size_, " tokens");
  if (tokens < 0 || tokens % s.block_size != 0 || tokens > from.size_ || tokens > s.capacity)
    Fail("KV cache: a shared prefix of ", tokens, " tokens (whole blocks of ", s.block_size,
         ", at most the ", from.size_, " the other cache holds and this one's capacity of ",
         s.capacity, ")");
  const int64_t nb = tokens / s.block_size;
  for (int64_t l = 0; l < s.layers; ++l) {
    if (s.IsRing(l)) Fail("KV cache: layer ", l, " is a ring: its blocks are not shared");
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t slot = from.table_[l][b];
      NEEDLE_CHECK(slot >= 0 && table_[l][b] < 0);
      pool_->Share(l, slot);
      table_[l][b] = slot;
    }
    if (table_mirror_ != nullptr && nb > 0)
      memory_->CopyFromHost(table_mirror_ + l * s.num_blocks(), table_[l].data(),
                            static_cast<size_t>(nb) * sizeof(int32_t));
  }
  size_ = tokens;
}

namespace {
// The bytes of one block of one layer in SwappedBlocks::data: K, V, and int8's scales.
size_t SwapBlockBytes(const BlockPool& pool) {
  return 2 * pool.BlockBytes() +
         (pool.shape().dtype == DType::kI8 ? 2 * pool.BlockScaleBytes() : 0);
}

// Copies one layer's blocks between the pool and SwappedBlocks::data, whose layer region holds
// [K of its n blocks][V][K scales][V scales] (int8), block i of each at i times the size: a run
// of blocks in consecutive slots is one copy per part (slots[i]: block i's slot). to_host: pool
// -> region, else region -> pool.
void CopyLayer(const BlockPool& pool, KVMemory* memory, int64_t layer,
               const std::vector<int32_t>& slots, uint8_t* region, bool to_host) {
  const size_t n = slots.size(), bb = pool.BlockBytes(), sb = pool.BlockScaleBytes();
  const bool i8 = pool.shape().dtype == DType::kI8;
  const auto copy = [&](uint8_t* host, uint8_t* dev, size_t bytes) {
    if (memory == nullptr)
      to_host ? std::memcpy(host, dev, bytes) : std::memcpy(dev, host, bytes);
    else if (to_host)
      memory->QueueToHost(host, dev, bytes);  // (FinishCopies: after the last layer)
    else
      memory->QueueFromHost(dev, host, bytes);
  };
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    while (j < n && slots[j] == slots[j - 1] + 1) ++j;
    const size_t m = j - i;
    for (int part = 0; part < (i8 ? 4 : 2); ++part) {
      const bool values = part % 2 == 1;
      const size_t each = part < 2 ? bb : sb;
      uint8_t* at = region + (part < 2 ? part * n * bb : 2 * n * bb + (part - 2) * n * sb);
      uint8_t* in_pool = part < 2
                             ? pool.BlockData(layer, values, slots[i])
                             : reinterpret_cast<uint8_t*>(pool.ScaleData(layer, values, slots[i]));
      copy(at + i * each, in_pool, m * each);
    }
    i = j;
  }
}
}  // namespace

void KVCache::SwapOut(SwappedBlocks* out) {
  if (own_ != nullptr || !shape_.ring_layer.empty())
    Fail("KV cache: only a sequence's cache over a shared pool is swapped out");
  if (swapped_) Fail("KV cache: swapped out twice");
  out->blocks.assign(static_cast<size_t>(shape_.layers), {});
  int64_t n = 0;
  for (const auto& t : table_)
    n += std::count_if(t.begin(), t.end(), [](int32_t x) { return x >= 0; });
  const size_t bytes = static_cast<size_t>(n) * SwapBlockBytes(*pool_);
  if (bytes > out->capacity) {
    const size_t avail = AvailableMemoryBytes();
    if (avail != 0 && bytes > avail)
      Fail("KV cache: swapping out ", n, " blocks needs ", FormatBytes(bytes), " of host memory; ",
           FormatBytes(avail), " are available");
    out->data.reset();  // (the old buffer first: both need not fit at once)
    KVMemory::HostFree free_fn = &std::free;
    void* p = memory_ != nullptr ? memory_->AllocateHost(bytes, &free_fn) : std::malloc(bytes);
    if (p == nullptr)
      Fail("KV cache: no host memory for ", FormatBytes(bytes), " of swapped blocks");
    out->data = {static_cast<uint8_t*>(p), free_fn};
    out->capacity = bytes;
  }
  out->bytes = bytes;
  uint8_t* region = out->data.get();
  std::vector<int32_t> slots;
  for (int64_t l = 0; l < shape_.layers; ++l) {
    slots.clear();
    for (size_t b = 0; b < table_[l].size(); ++b)
      if (table_[l][b] >= 0) {
        slots.push_back(table_[l][b]);
        out->blocks[l].push_back(static_cast<int64_t>(b));
      }
    CopyLayer(*pool_, memory_, l, slots, region, true);
    region += slots.size() * SwapBlockBytes(*pool_);
  }
  if (memory_ != nullptr) memory_->FinishCopies();
  for (int64_t l = 0; l < shape_.layers; ++l)
    for (const int64_t b : out->blocks[l]) {
      pool_->Free(l, table_[l][static_cast<size_t>(b)]);
      table_[l][static_cast<size_t>(b)] = -1;
    }
  swapped_ = true;
}

void KVCache::SwapIn(SwappedBlocks* in) {
  if (!swapped_) Fail("KV cache: swapped in without being swapped out");
  NEEDLE_CHECK(in->blocks.size() == static_cast<size_t>(shape_.layers));
  for (int64_t l = 0; l < shape_.layers; ++l)
    if (pool_->FreeSlots(l) < static_cast<int64_t>(in->blocks[l].size()))
      Fail("KV cache: swapping in ", in->blocks[l].size(), " blocks of layer ", l, " with ",
           pool_->FreeSlots(l), " of the pool's ", pool_->slots(l), " free");
  uint8_t* region = in->data.get();
  std::vector<int32_t> slots;
  for (int64_t l = 0; l < shape_.layers; ++l) {
    slots.clear();
    for (const int64_t b : in->blocks[l]) {
      slots.push_back(pool_->Allocate(l));
      table_[l][static_cast<size_t>(b)] = slots.back();
    }
    CopyLayer(*pool_, memory_, l, slots, region, false);
    region += slots.size() * SwapBlockBytes(*pool_);
  }
  if (memory_ != nullptr) memory_->FinishCopies();
  if (table_mirror_ != nullptr)
    for (int64_t l = 0; l < shape_.layers; ++l)
      memory_->CopyFromHost(table_mirror_ + l * shape_.num_blocks(), table_[l].data(),
                            table_[l].size() * sizeof(int32_t));
  in->blocks.clear();
  in->bytes = 0;  // (the buffer stays: SwappedBlocks)
  swapped_ = false;
}

void KVCache::Truncate(int64_t n) {
  if (n < 0 || n > size_) Fail("KV cache: truncating to ", n, " tokens, the cache holds ", size_);
  if (swapped_) Fail("KV cache: truncated while swapped out");
  const int64_t keep = (n + shape_.block_size - 1) / shape_.block_size, nb = shape_.num_blocks();
  for (int64_t l = 0; l < shape_.layers; ++l) {
    std::vector<int32_t>& table = table_[l];
    const bool ring = shape_.IsRing(l);
    int64_t hi = -1;
    for (int64_t b = keep; b < nb; ++b) {
      if (table[b] < 0) continue;
      if (!ring) pool_->Free(l, table[b]);
      table[b] = -1;
      hi = b;
    }
    if (hi >= keep && table_mirror_ != nullptr)
      memory_->CopyFromHost(table_mirror_ + l * nb + keep, &table[keep],
                            static_cast<size_t>(hi - keep + 1) * sizeof(int32_t));
  }
  size_ = n;
}

void KVCache::SetSize(int64_t n) {
  NEEDLE_CHECK(n >= 0 && n <= shape_.num_blocks() * shape_.block_size);
  size_ = n;
}

}  // namespace needle
