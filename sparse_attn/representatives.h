// Representative keys of Context blocks, per layer, per block and per KV head (never per query
// head: under GQA the group's queries are combined at scoring time).
//   Max     [1, D]  channel-wise max of the block's keys (initialised at -inf, not 0)
//   Mean    [1, D]  channel-wise mean
//   Quest   [2, D]  channel-wise max and min (initialised at -inf / +inf)
//   Dynamic [1, D]  the sum of the keys of the repr_count tokens that received the most attention
//                   (InfLLM eq. 2 sums q . r_j over representatives, so storing their sum scores
//                   identically at a 1/repr_count of the bytes)
// Stored in f32 when the KV cache is f32, else in bf16 (ranking only needs ~3 digits, and the
// scoring scan reads every representative each selection).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/base/dtype.h"
#include "kvcache/kv_cache.h"
#include "sparse_attn/sparse_config.h"

namespace needle {

class RepresentativeStore {
 public:
  RepresentativeStore(int64_t layers, int64_t kv_heads, int64_t head_dim, int64_t max_blocks,
                      ReprType type, DType storage);

  int64_t rows() const { return rows_; }  // R: 2 for Quest, else 1
  DType storage() const { return storage_; }
  ReprType type() const { return type_; }
  bool ready(int64_t layer, int64_t block) const { return ready_[layer][block] != 0; }
  void Invalidate(int64_t layer, int64_t from_block);
  // Counts the computations of a block's representatives (never reset): a copy elsewhere (the
  // hybrid engine's, on the GPU) is current when it was taken at the same stamp.
  uint32_t stamp(int64_t layer, int64_t block) const { return stamp_[layer][block]; }
  // Counts every change to `layer` (computations and invalidations; never reset): a reader that
  // saw every block it cares about at one version needs to look again only after it moves.
  uint64_t version(int64_t layer) const { return version_[layer].load(std::memory_order_relaxed); }
  size_t BlockBytes() const {
    return static_cast<size_t>(kv_heads_ * rows_ * head_dim_) * DTypeSize(storage_);
  }
  int64_t max_blocks() const { return max_blocks_; }
  int64_t layers() const { return static_cast<int64_t>(data_.size()); }
  // Whether CopyBlock can take o's blocks (same type, storage and shapes).
  bool SameKind(const RepresentativeStore& o) const {
    return o.type_ == type_ && o.storage_ == storage_ && o.rows_ == rows_ &&
           o.kv_heads_ == kv_heads_ && o.head_dim_ == head_dim_ && o.layers() == layers();
  }

  // Representatives [kv_heads][R][D] of `block` (storage type).
  const void* Block(int64_t layer, int64_t block) const;

  // Max/Mean/Quest from the block's keys (the block must be full). With relative_freq (the
  // RoPE frequencies [head_dim / 2]; --pos-remap block), from the keys rotated back by the
  // block's first position, i.e. as if the block started at position 0: representatives of the
  // block wherever it is moved (SparseConfig::RemapScoreShift). Threads may compute distinct
  // blocks at once.
  void ComputeFromKeys(int64_t layer, int64_t block, const KVLayerView& kv,
                       const float* relative_freq = nullptr);
  // Block `from_block` of `from` (of the same type, storage and shapes; ready there) as this
  // store's `block`: the representatives a prefix's blocks keep for the sequences sharing them.
  void CopyBlock(const RepresentativeStore& from, int64_t layer, int64_t from_block, int64_t block);
  // Blocks [0, blocks) of every layer as bytes (per layer, per block: a ready byte, then the
  // block's representatives), for a KV file's extra section; LoadBlocks takes them back (into a
  // store of the same kind with room for them) and throws Error, naming `what`, for bytes of
  // another size.
  std::vector<uint8_t> SaveBlocks(int64_t blocks) const;
  void LoadBlocks(const std::vector<uint8_t>& bytes, int64_t blocks, const std::string& what);
  // Dynamic: votes [kv_heads][block_size] (attention received by each token of the block).
  void ComputeDynamic(int64_t layer, int64_t block, const KVLayerView& kv, const float* votes,
                      int64_t repr_count);

 private:
  void Store(int64_t layer, int64_t block, int64_t h, int64_t r, const float* v);
  int64_t kv_heads_, head_dim_, max_blocks_, rows_;
  ReprType type_;
  DType storage_;
  std::vector<std::vector<uint8_t>> data_;            // [layer] -> [block][kv_head][R][D]
  std::vector<std::vector<uint8_t>> ready_;           // [layer][block]
  std::vector<std::vector<uint32_t>> stamp_;          // [layer][block]
  std::unique_ptr<std::atomic<uint64_t>[]> version_;  // [layer]
};

}  // namespace needle
