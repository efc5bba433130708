// Re-ranking a shortlist of Context blocks by their best single key (SparseConfig::rescore_blocks).
//
// A representative summarizes a block in one or two vectors; blocks of near-identical text
// (kv_retrieval's JSON of UUID pairs) then score alike, and the block a query needs can rank
// below others (bench/RESULTS.md, issue 24). The best single key scores a block by what its
// strongest key would get:
//   best(b, h) = max over the block's keys k of  qs_h . k,
//   qs_h = the sum over queries i and the GQA group's query heads g of q_{i,g}
// (the queries combined as scoring combines them; with --pos-remap, rotated as for scoring, and
// each key rotated back to its block's start as the representatives are). Quest's score is an
// upper bound of it: for every key, sum_c q_c k_c <= sum_c max(q_c max_c, q_c min_c).
// It reads every key of the blocks, so the planner applies it to a shortlist only.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/base/threading.h"
#include "kvcache/kv_cache.h"
#include "sparse_attn/scoring.h"

namespace needle {

// out [a.n]: best(a.blocks[j], kv_head), or with kv_head -1 the sum over every KV head (per-layer
// selection). qs [kv_heads, D]: each KV head's queries summed (the plain sum of the scoring
// queries), or nullptr: summed here from a.q [a.nq, a.heads, D], rotated like the keys (the
// scoring queries). kv: the layer's keys (whole blocks); relative_freq: --pos-remap's RoPE
// frequencies, else nullptr. The blocks are shared out over tc's threads.
void BestKeyScores(const ScoreArgs& a, const float* qs, const KVLayerView& kv,
                   const float* relative_freq, int64_t kv_head, ThreadingContext& tc, float* out);

// qa + qb: the plain sums from GroupQueries' (or an executor's ChunkQueries') pair, which Quest
// splits by sign (for the other representatives qb is zeros).
std::vector<float> CombineQuerySums(const std::vector<float>& qa, const std::vector<float>& qb);

// The `want` best of candidates ids / scores [n] (higher score first, then lower id), ascending:
// with rescore > want, the `rescore` best by score re-ranked by BestKeyScores (a: the shapes, and
// the scoring queries where qs is nullptr; its blocks / n are ignored); else by score alone.
std::vector<int32_t> RankCandidates(const float* scores, const int32_t* ids, int64_t n,
                                    int64_t want, int64_t rescore, const ScoreArgs& a,
                                    const float* qs, const KVLayerView& kv,
                                    const float* relative_freq, int64_t kv_head,
                                    ThreadingContext& tc);

}  // namespace needle
