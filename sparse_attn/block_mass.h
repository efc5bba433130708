// The softmax mass a decode query put on each attended Context block, for selection retention
// (SparseConfig::retain_blocks): the blocks a head is reading now (a copy's source moves one
// token per step) stay in its next selection even when their representatives score low.
//   mass[h][i] = sum over the GQA group's query heads g of sum over the tokens j of block
//                blocks[h][i] of exp(scale * q_{h*G+g} . k_j - lse_{h*G+g})
// lse is the log-sum-exp (natural log) of scale * q.k over every key the step attended, as
// Backend::Attention returns it, so each term is a probability and mass[h][i] lies in [0, G].
#pragma once

#include <cstdint>
#include <vector>

#include "engine/base/threading.h"
#include "kvcache/kv_cache.h"

namespace needle {

struct BlockMassArgs {
  const float* q;    // [heads, D]: the step's query, rotated like the cached keys
  const float* lse;  // [heads]
  int64_t heads, kv_heads, head_dim;
  float scale;
  const std::vector<std::vector<int32_t>>* blocks;  // [kv_heads][n_h]: attended Context blocks
  // Position remapping (optional): the group's queries as each block was scored,
  // [sum over h of n_h][G][D] in the order of blocks (head by head); q is not read then.
  const float* q_per_block = nullptr;
};

namespace fast {
// mass: resized to [kv_heads][n_h], in the order of blocks.
void BlockMass(const KVLayerView& kv, const BlockMassArgs& a, std::vector<std::vector<float>>* mass,
               ThreadingContext& tc);
}  // namespace fast
namespace ref {
void BlockMass(const KVLayerView& kv, const BlockMassArgs& a, std::vector<std::vector<float>>* mass,
               ThreadingContext& tc);
}  // namespace ref

}  // namespace needle
