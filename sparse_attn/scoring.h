// Scores Context blocks against the current queries through their representatives:
//   Max / Mean / Dynamic (InfLLM eq. 2):  score(b, h) = sum over queries i and the GQA group's
//                                          query heads g of  q_{i,g} . r_{b,h}
//   Quest (upper bound of q . k):          score(b, h) = sum_{i,g} sum_c max(q_c * max_c, q_c *
//   min_c)
// One scalar per (KV head, block); selection per layer sums them over KV heads. No 1/sqrt(d)
// and no softmax: only the ranking matters.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/base/threading.h"
#include "sparse_attn/representatives.h"

namespace needle {

struct ScoreArgs {
  const float* q;  // [nq, heads, D], rotated like the cached keys
  int64_t nq, heads, kv_heads, head_dim;
  const int32_t* blocks;  // candidate block ids [n], ascending
  int64_t n;
};

// The queries of each KV head's group, combined as scoring uses them: qa [kv_heads, D] = sum of
// the group's queries (Quest: of their positive parts), qb [kv_heads, D] = Quest: sum of their
// negative parts (else zeros). score(b, h) = qa_h . r0 + qb_h . r1 (r1: Quest's min row).
void GroupQueries(const ScoreArgs& a, bool quest, float* qa, float* qb);

// Layer selection: row 0 of scores [kv_heads][n] becomes the sum over KV heads, in head order (the
// order the GPU's cuda::TopBlocks sums in).
void SumOverHeads(float* sc, int64_t kv_heads, int64_t n);

namespace fast {
// scores: [kv_heads][n]
void ScoreBlocks(const RepresentativeStore& reps, int64_t layer, const ScoreArgs& a, float* scores,
                 ThreadingContext& tc);
// The same from the queries combined already (GroupQueries' qa, qb [kv_heads, D], made where the
// queries are); a.q is not read.
void ScoreGrouped(const RepresentativeStore& reps, int64_t layer, const ScoreArgs& a,
                  const std::vector<float>& qa, const std::vector<float>& qb, float* scores,
                  ThreadingContext& tc);
}  // namespace fast
namespace ref {
void ScoreBlocks(const RepresentativeStore& reps, int64_t layer, const ScoreArgs& a, float* scores,
                 ThreadingContext& tc);
}  // namespace ref

}  // namespace needle
