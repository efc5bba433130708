// The observation window: the last obs_window queries (of the prompt at the end of prefill, or
// the most recent decode queries) vote for the keys they attend, SnapKV-style:
//   vote(h, j) = sum over window queries i (at positions >= j) and the group's query heads g of
//                softmax_i(scale * q_{i,g} . k_j) = exp(scale * q_{i,g} . k_j - lse_{i,g})
// Votes drive Dynamic representatives (most-attended tokens of a block) and preselection.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/base/threading.h"
#include "kvcache/kv_cache.h"
#include "sparse_attn/sparse_config.h"

namespace needle {

// A ring of the most recent queries of one layer with their log-sum-exp.
class QueryWindow {
 public:
  QueryWindow(int64_t capacity, int64_t heads, int64_t head_dim)
      : cap_(capacity), heads_(heads), dim_(head_dim) {}
  // q: [heads, D] of the query at `pos`; lse: [heads] (may be null: filled later by SetLse).
  void Push(const float* q, const float* lse, int64_t pos);
  void Clear() { q_.clear(), lse_.clear(), pos_.clear(); }
  int64_t size() const { return static_cast<int64_t>(pos_.size()); }
  // Oldest first: q [size, heads, D], lse [size, heads], positions [size].
  const std::vector<float>& q() const { return q_; }
  std::vector<float>& lse() { return lse_; }
  const std::vector<float>& lse() const { return lse_; }
  const std::vector<int64_t>& pos() const { return pos_; }

 private:
  int64_t cap_, heads_, dim_;
  std::vector<float> q_, lse_;
  std::vector<int64_t> pos_;
};

// votes [kv_heads][e - b] for keys [b, e) from the window's queries (and their lse).
void ObservationVotes(const KVLayerView& kv, const QueryWindow& w, int64_t heads, float scale,
                      int64_t b, int64_t e, ThreadingContext& tc, std::vector<float>* votes);

// SnapKV-style preselection: max-pool the votes [kv_heads][n_keys] over `pool` neighbouring tokens,
// sum them per block, and keep the `count` best blocks of [first_block, end_block) per KV head
// (kvhead mode) or by the sum over KV heads (layer mode). Returns flags [kv_heads][end_block].
std::vector<std::vector<uint8_t>> Preselect(const std::vector<float>& votes, int64_t kv_heads,
                                            int64_t n_keys, int64_t block_size, int64_t first_block,
                                            int64_t end_block, int64_t count, int64_t pool,
                                            SelectMode mode);

// The k best of ids[n] by score (higher first, ties to the lower id), returned in ascending id
// order.
std::vector<int32_t> TopK(const float* scores, const int32_t* ids, int64_t n, int64_t k);

}  // namespace needle
