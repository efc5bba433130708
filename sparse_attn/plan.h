// The printable plan that sparse attention's kernels consume: for one decode step and layer,
// which keys each KV head attends (Initial + selected Context blocks + Local).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/cpu/ops.h"

namespace needle {

struct LayerPlan {
  int64_t step = 0;  // decode step (0 = first token after the prompt)
  int64_t layer = 0;
  int64_t pos = 0;  // position of the query
  int64_t block_size = 0;
  bool dense = false;    // attends every key (a dense layer, or no Context region yet)
  bool reused = false;   // selection reused from an earlier token or layer (token_step/layer_step)
  int64_t init_end = 0;  // Initial: tokens [0, init_end)
  int64_t local_begin = 0;                   // Local: tokens [local_begin, pos]
  int64_t candidates = 0;                    // Context blocks that were eligible for selection
  std::vector<std::vector<int32_t>> blocks;  // [kv_head] selected Context blocks, ascending
  // [kv_head] the blocks of `blocks` kept from the previous step for their attention mass
  // (SparseConfig::retain_blocks), ascending; empty when none.
  std::vector<std::vector<int32_t>> retained;

  // Spans for a single query at `pos`, per KV head (AttnSpans item = KV head).
  void ToSpans(int64_t kv_heads, AttnSpans* out) const;
  int64_t AttendedTokens(int64_t h) const;
  std::string ToJson() const;  // one line
};

}  // namespace needle
