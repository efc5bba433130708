#include "sparse_attn/sparse_config.h"

#include <algorithm>
#include <numeric>
#include <sstream>

#include "engine/base/error.h"

namespace needle {

const char* ReprTypeName(ReprType r) {
  switch (r) {
    case ReprType::kMax:
      return "max";
    case ReprType::kMean:
      return "mean";
    case ReprType::kQuest:
      return "quest";
    case ReprType::kDynamic:
      return "dynamic";
  }
  return "?";
}

const char* SelectModeName(SelectMode m) { return m == SelectMode::kLayer ? "layer" : "kvhead"; }

ReprType ParseReprType(const std::string& s, const std::string& what) {
  for (ReprType r : {ReprType::kMax, ReprType::kMean, ReprType::kQuest, ReprType::kDynamic})
    if (s == ReprTypeName(r)) return r;
  Fail(what, ": unknown representative type '", s, "' (expected max, mean, quest or dynamic)");
}

SelectMode ParseSelectMode(const std::string& s, const std::string& what) {
  if (s == "layer") return SelectMode::kLayer;
  if (s == "kvhead") return SelectMode::kKVHead;
  Fail(what, ": unknown selection mode '", s, "' (expected layer or kvhead)");
}

void SparseConfig::Validate() const {
  if (block_size <= 0) Fail("sparse attention: block_size must be positive (got ", block_size, ")");
  if (local_window < block_size)
    Fail("sparse attention: local_window (", local_window,
         ") must be at least one block (block_size ", block_size, ")");
  if (topk <= 0) Fail("sparse attention: topk must be positive (got ", topk, ")");
  if (init_tokens < 0)
    Fail("sparse attention: init_tokens must not be negative (got ", init_tokens, ")");
  if (obs_window <= 0) Fail("sparse attention: obs_window must be positive (got ", obs_window, ")");
  if (repr == ReprType::kDynamic && (repr_count <= 0 || repr_count > block_size))
    Fail("sparse attention: repr_count (", repr_count, ") must be in [1, block_size = ", block_size,
         "]");
  if (dense_layers < 0)
    Fail("sparse attention: dense_layers must not be negative (got ", dense_layers, ")");
  if (token_step <= 0) Fail("sparse attention: token_step must be positive (got ", token_step, ")");
  if (layer_step <= 0) Fail("sparse attention: layer_step must be positive (got ", layer_step, ")");
  if (preselect_blocks < 0)
    Fail("sparse attention: preselect_blocks must not be negative (got ", preselect_blocks, ")");
  if (preselect_blocks > 0 && preselect_blocks < topk)
    Fail("sparse attention: preselect_blocks (", preselect_blocks, ") is smaller than topk (", topk,
         "): the candidate set could not fill the selection");
  if (rescore_blocks != 0 && rescore_blocks < topk)
    Fail("sparse attention: rescore_blocks (", rescore_blocks,
         ") must be 0 (off) or at least topk (", topk, ")");
  if (rescore_last != 0 && rescore_last < topk)
    Fail("sparse attention: rescore_last (", rescore_last, ") must be 0 (off) or at least topk (",
         topk, ")");
  if (retain_blocks < 0)
    Fail("sparse attention: retain_blocks must not be negative (got ", retain_blocks, ")");
  if (prefill_chunk <= 0)
    Fail("sparse attention: prefill_chunk must be positive (got ", prefill_chunk, ")");
  if (sparse_prefill && repr == ReprType::kDynamic)
    Fail(
        "sparse attention: sparse_prefill scores blocks while the prompt streams, before Dynamic "
        "representatives exist (they need the prompt's last queries): use repr quest, max or "
        "mean");
  if (gpu_share < 0 || gpu_share > 100)
    Fail("sparse attention: gpu_share must be a percentage in [0, 100] (got ", gpu_share, ")");
  if (gpu_cache_blocks < 0)
    Fail("sparse attention: gpu_cache_blocks must be >= 0 (got ", gpu_cache_blocks, ")");
  if (preselect_pool <= 0 || preselect_pool % 2 == 0)
    Fail("sparse attention: preselect_pool must be a positive odd width (got ", preselect_pool,
         ")");
}

int64_t SparseConfig::ShareablePrefix(int64_t want, int64_t prompt, int64_t donor_prompt,
                                      int64_t ubatch) const {
  int64_t n = std::min(want, prompt - 1);
  if (repr == ReprType::kDynamic || preselect_blocks > 0) n = std::min(n, prompt - obs_window);
  int64_t unit = block_size;
  if (sparse_prefill) {
    n = std::min(n, donor_prompt - 1);
    unit = std::lcm(std::lcm(block_size, prefill_chunk), std::max<int64_t>(ubatch, 1));
  }
  return n <= 0 ? 0 : n / unit * unit;
}

std::string SparseConfig::Describe() const {
  std::ostringstream os;
  os << "block_size=" << block_size << " init_tokens=" << init_tokens
     << " local_window=" << local_window << " topk=" << topk << " repr=" << ReprTypeName(repr);
  if (repr == ReprType::kDynamic) os << " repr_count=" << repr_count;
  os << " select=" << SelectModeName(select) << " dense_layers=" << dense_layers
     << " token_step=" << token_step << " layer_step=" << layer_step
     << " preselect_blocks=" << preselect_blocks;
  if (preselect_blocks > 0) os << " preselect_pool=" << preselect_pool;
  os << " retain_blocks=" << retained();
  if (rescore_blocks > 0) os << " rescore_blocks=" << rescore_blocks;
  if (sparse_prefill) os << " prefill=sparse prefill_chunk=" << prefill_chunk;
  if (sparse_prefill) os << " rescore_last=" << rescore_last;
  if (pos_remap) os << " pos_remap=block";
  if (preselect_blocks > 0 || repr == ReprType::kDynamic) os << " obs_window=" << obs_window;
  return os.str();
}

}  // namespace needle
