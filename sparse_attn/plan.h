// The printable plan that sparse attention's kernels consume: for one decode step and layer,
// which keys each KV head attends (Initial + selected Context blocks + Local).
#pragma once

#include <cstdint>
#include <map>
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
  bool remap = false;  // block-wise position remapping (AppendQuerySpans)

  // Spans for a single query at `pos`, per KV head (AttnSpans item = KV head); with `remap`,
  // their rotations from inv_freq [head_dim / 2] (the call's RoPE frequencies).
  // local false: without the Local keys (the hybrid engine's GPU attends them).
  void ToSpans(int64_t kv_heads, AttnSpans* out, const float* inv_freq = nullptr,
               int64_t head_dim = 0, bool local = true) const;
  int64_t AttendedTokens(int64_t h) const;
  std::string ToJson() const;  // one line
};

// The row of `table` ([rows][head_dim], RotationRow's) that holds the rotation by `delta`,
// appended the first time a delta is asked for (`rows`: delta -> row, kept by the caller).
int32_t SharedRotationRow(int64_t delta, const float* inv_freq, int64_t head_dim,
                          std::vector<float>* table, std::map<int64_t, int32_t>* rows);

// Appends one (query, KV head) item to `out`: Initial [0, ie), the Context `blocks` (ascending,
// of block_size B) and Local [lb, p + 1), adjacent ranges merged.
// With inv_freq (block-wise position remapping, --pos-remap block), the attended keys are scored
// as if contiguous: Initial where they are, block i at ie + i*B, Local right after the last
// block, and the query at ie + k*B + (p - lb) (k blocks). The cache holds keys rotated at their
// true positions, so a span moved by m positions is scored with the query rotated by
// delta = (ie + k*B - lb) - m (Local: 0): q_rot(p + delta) . k_rot(j) = q . R(j + m - p') k.
// Rotation rows are shared through `rows` (delta -> row of out->rot_table).
// AppendQuerySpans' delta for the i-th (0-based) of k selected blocks, whose first token is b0:
// (ie + k*B - lb) - (ie + i*B - b0).
int64_t RemapBlockDelta(int64_t ie, int64_t k, int64_t B, int64_t lb, int64_t i, int64_t b0);
// local false: without the Local range.
void AppendQuerySpans(int64_t ie, const std::vector<int32_t>& blocks, int64_t B, int64_t lb,
                      int64_t p, const float* inv_freq, int64_t head_dim, AttnSpans* out,
                      std::map<int64_t, int32_t>* rows, bool local = true);

}  // namespace needle
