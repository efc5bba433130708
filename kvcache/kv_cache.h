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
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "engine/base/dtype.h"
#include "kvcache/block_pool.h"
#include "kvcache/kv_cache_shape.h"

namespace needle {

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
  // Entries from one KV head's table to the next's: 0, one table for every head (a cache's own
  // view); else table [kv_heads][table_head_stride], each head its own blocks (the GPU's view of a
  // step's selected blocks, read where they lie: the device plan).
  int64_t table_head_stride = 0;
  // With a table per KV head, the view keys [table_step_lo, table_step_hi) whose entries the
  // kernel just before the attention writes in the step: the GPU's attention reads them only
  // after its wait for that kernel (engine/cuda/pdl.cuh). Default every key (the hybrid's gather
  // writes the whole table, and the blocks); the device plan's selection writes only the Context
  // entries.
  int64_t table_step_lo = 0, table_step_hi = INT64_MAX;

  size_t RowIndex(int64_t h, int64_t token) const {
    const int64_t slot = table[h * table_head_stride + token / block_size];
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
  // After all work queued on the memory so far (a prefill's writes) has finished.
  virtual void CopyToHost(void* dst, const void* src, size_t bytes) = 0;

  // Many copies (a swap's blocks): queued in order, after all work queued on the memory so far,
  // and complete only once FinishCopies returns. By default each is done at once.
  virtual void QueueToHost(void* dst, const void* src, size_t bytes) {
    CopyToHost(dst, src, bytes);
  }
  virtual void QueueFromHost(void* dst, const void* src, size_t bytes) {
    CopyFromHost(dst, src, bytes);
  }
  virtual void FinishCopies() {}

  // Host memory that copies to and from this memory go fastest with (the GPU's: page-locked,
  // copied by DMA without the driver's staging), freed with *free_fn. By default malloc's, or
  // when the memory cannot lock that much; nullptr when there is none.
  using HostFree = void (*)(void*);
  virtual void* AllocateHost(size_t bytes, HostFree* free_fn) {
    *free_fn = &std::free;
    return std::malloc(bytes);
  }
};

// A sequence's blocks moved out of their pool into host memory (KVCache::SwapOut; the Engine's
// preemption), by layer and logical block.
struct SwappedBlocks {
  std::vector<std::vector<int64_t>> blocks;  // [layer]: the logical blocks copied out
  // Per layer: the K data of its copied blocks in order, their V data, then (int8) their K
  // scales and V scales (blocks in consecutive slots move in one copy). `bytes` of them are in
  // use; the buffer (`capacity` bytes, never zero-filled) outlives a SwapIn for the next
  // SwapOut, whose copies then land in memory already mapped (fresh pages cost more to fault in
  // and clear than to fill: 0.3 GB/s on the dev VM).
  // (Pinned where the pool is in GPU memory: KVMemory::AllocateHost.)
  std::unique_ptr<uint8_t, KVMemory::HostFree> data{nullptr, &std::free};
  size_t bytes = 0, capacity = 0;
  int64_t count() const {
    int64_t n = 0;
    for (const auto& b : blocks) n += static_cast<int64_t>(b.size());
    return n;
  }
};

class KVCache {
 public:
  // A cache with a pool of its own for the whole context (shape.capacity tokens).
  // memory_limit: bytes the cache may take (0: the memory's available bytes). Throws Error
  // naming the requested and the allowed bytes when the context does not fit. memory: where the
  // arenas live (nullptr: host DRAM); caches elsewhere are written by the backend (KVWrite).
  explicit KVCache(const KVCacheShape& shape, size_t memory_limit = 0, KVMemory* memory = nullptr);
  // One sequence of up to `capacity` tokens over a pool shared with others (no ring layers):
  // its blocks are taken from the pool as it grows (AssignBlocks: an Error naming the pool's size
  // when none is left) and given back by Clear and the destructor.
  KVCache(BlockPool& pool, int64_t capacity);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const KVCacheShape& shape() const { return shape_; }
  BlockPool& pool() const { return *pool_; }
  // Unique per cache constructed in this process (a later cache may reuse a freed one's
  // addresses, never its id): what recorded work that holds the cache's pointers is keyed by.
  uint64_t id() const { return id_; }
  int64_t size() const { return size_; }  // tokens valid in every layer
  void Clear();                           // (its blocks back to the pool)

  // Writes T tokens at positions [pos0, pos0 + T) of `layer` from f32 rows
  // k, v: [T, kv_heads, head_dim], converting (int8: quantising per group) to the cache type.
  // Host caches only. Writes to disjoint blocks may run on several threads at once only when
  // AssignBlocks has covered their positions before (assigning takes blocks from the pool and
  // changes the table: one thread at a time).
  void Write(int64_t layer, int64_t pos0, int64_t T, const float* k, const float* v);
  // Assigns slots to the blocks of positions [pos0, pos0 + T) of `layer` (and updates the
  // table's copy in the cache's memory); the step before any write, host or device.
  void AssignBlocks(int64_t layer, int64_t pos0, int64_t T);
  bool on_host() const { return memory_ == nullptr; }
  // Marks tokens [0, n) valid (after every layer of a step wrote them); n may also shrink.
  void SetSize(int64_t n);
  // Keeps tokens [0, n) only (n <= size()): every block past the one that holds token n - 1 is
  // given up (back to the pool, or out of its ring: a later block that takes its ring slot must
  // not find it still mapped), and the size becomes n. Tokens of the last kept block past n stay
  // until overwritten. For a sequence that goes on from an earlier point of itself (needle ask
  // on the hybrid engine: every question from the end of the document).
  void Truncate(int64_t n);
  // Takes the first `tokens` tokens (a multiple of block_size, at most from.size()) of `from`, a
  // cache of the same pool, by reference: its blocks, counted once more in the pool, become this
  // cache's first blocks, and this cache's size becomes `tokens` (an empty cache only). Whole
  // blocks only, so neither cache ever writes a block the other reads: each appends past them
  // into blocks of its own (the partial block after a shared prefix is computed again, not
  // copied). Errors name the mismatch.
  void SharePrefix(const KVCache& from, int64_t tokens);
  // Copies every block of the cache into host memory (*out) and gives up its references: blocks
  // only it held go back to the pool, blocks shared with other caches stay theirs. The cache
  // keeps its size and must not be read or written until SwapIn. A pool's cache only (no ring
  // layers).
  void SwapOut(SwappedBlocks* out);
  // Takes slots for the swapped blocks again (an Error naming the pool's size when too few are
  // free, nothing taken) and copies them back: the cache reads as before SwapOut, from slots of
  // its own (blocks it shared before are its own copies now). `in` is emptied, its buffer kept
  // for a later SwapOut.
  void SwapIn(SwappedBlocks* in);
  bool swapped() const { return swapped_; }

  // Pointers into the cache's memory (device pointers for a device cache, table included).
  KVLayerView Layer(int64_t layer) const;
  // The slot logical block b of `layer` occupies (-1: unassigned or evicted from a ring).
  int32_t SlotOf(int64_t layer, int64_t b) const { return table_[layer][b]; }
  // The K (values == false) or V data of one slot of `layer`: [kv_heads][block_size][head_dim]
  // elements, in the cache's memory (for copies between caches; not int8 scales).
  uint8_t* BlockData(int64_t layer, bool values, int64_t slot) const {
    return pool_->BlockData(layer, values, slot);
  }
  size_t BlockBytes() const { return pool_->BlockBytes(); }

 private:
  void InitTables();
  void FreeBlocks();  // every non-ring slot of the tables back to the pool

  std::unique_ptr<BlockPool> own_;  // the cache's own pool, or null (a shared one)
  BlockPool* pool_ = nullptr;
  KVCacheShape shape_;  // the pool's, with this cache's capacity
  uint64_t id_;
  KVMemory* memory_ = nullptr;
  int32_t* table_mirror_ = nullptr;  // [layer][block] in memory_ (device caches)
  int64_t size_ = 0;
  bool swapped_ = false;
  std::vector<std::vector<int32_t>> table_;  // [layer][logical block] -> slot, -1 = unassigned
};

// MemAvailable from /proc/meminfo in bytes (0 when unknown).
size_t AvailableMemoryBytes();
// "1.5 GiB" and the like.
std::string FormatBytes(size_t n);
// Parses a byte count with an optional K/M/G/T suffix (powers of 1024); throws naming `what`.
size_t ParseByteSize(const std::string& s, const std::string& what);

}  // namespace needle
