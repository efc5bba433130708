// --prefill sparse, the planner's side: a prompt micro-batch's chunks, each scoring the Context
// blocks with its queries and attending Initial + its selection + Local + itself
// (SparseAttention::SparsePrefill); the executor attends them, and may score them where the
// queries are (PlanExecutor::ChunkQueries, ChunkTop).
#include <algorithm>
#include <chrono>
#include <map>
#include <numeric>

#include "engine/base/error.h"
#include "engine/base/seconds.h"
#include "sparse_attn/best_key.h"
#include "sparse_attn/observation.h"
#include "sparse_attn/scoring.h"
#include "sparse_attn/sparse_attention.h"

namespace needle {

std::vector<SparseAttention::ChunkSpec> SparseAttention::PrefillChunks(const AttnArgs& a) const {
  std::vector<ChunkSpec> out;
  const int64_t end = a.pos0 + a.T, init_blocks = cfg_.init_end() / cfg_.block_size;
  for (int64_t c0 = a.pos0, n = 0; c0 < end; c0 += n) {
    n = std::min(cfg_.prefill_chunk, end - c0);
    // The prompt's last query predicts the first answer token: in a prompt longer than one chunk
    // it selects its blocks alone, as a decode query does, rather than with its chunk's sum.
    if (step_.last_of_call && c0 + n == end && n > 1 && c0 > 0) --n;
    const int64_t lb = cfg_.LocalBegin(c0);
    const bool last_alone = step_.last_of_call && c0 + n == end && n == 1;
    out.push_back({c0, n, lb / cfg_.block_size > init_blocks,
                   cfg_.pos_remap ? cfg_.RemapScoreShift(lb) : 0, init_blocks,
                   std::max(init_blocks, lb / cfg_.block_size), false,
                   last_alone ? cfg_.RescoreLast() : cfg_.rescore_blocks});
  }
  return out;
}

std::vector<SparseAttention::ChunkSpec> SparseAttention::PrefillChunkScoring(
    int64_t layer, const AttnArgs& a, const KVLayerView& kv) {
  std::vector<ChunkSpec> out = PrefillChunks(a);
  int64_t end = 0;  // the candidates to make ready: before the micro-batch's first block
  int64_t want = 0;
  bool sum_heads = false;
  ChunkShortlist(&want, &sum_heads);
  for (ChunkSpec& ck : out) {
    // (A chunk that re-ranks more candidates than the executor's shortlist holds, the prompt's
    // last query with --rescore-last, is scored here.)
    ck.executor_top = ck.scores && ck.cand_end * cfg_.block_size <= a.pos0 && ck.rescore <= want;
    if (ck.executor_top) end = std::max(end, ck.cand_end);
  }
  if (end > 0) {
    const auto t = Clock::now();
    EnsureRepresentatives(layer, kv, cfg_.init_end() / cfg_.block_size, end, a.scale,
                          RelativeFreq(a));
    times_.reps += Since(t);
  }
  return out;
}

void SparseAttention::SparsePrefill(int64_t layer, const float* q, const AttnArgs& a,
                                    const KVLayerView& kv, float* out, float* lse) {
  const int64_t B = cfg_.block_size, init_blocks = cfg_.init_end() / B, Hk = a.kv_heads;
  const int64_t HD = a.heads * a.head_dim;
  const float* rel = RelativeFreq(a);  // --pos-remap's frequencies (checked), else nullptr
  AttnSpans spans;
  std::vector<float> qa(static_cast<size_t>(Hk * a.head_dim)), qb(qa.size());
  for (const ChunkSpec& ck : PrefillChunks(a)) {
    const int64_t c0 = ck.c0, n = ck.n;
    AttnArgs ca = a;
    ca.pos0 = c0;
    ca.T = n;
    const float* cq = q + (c0 - a.pos0) * HD;
    // The chunk's Context: the whole blocks between Initial and its first query's Local region.
    const int64_t lb = cfg_.LocalBegin(c0), ctx_end_block = lb / B;
    std::vector<std::vector<int32_t>> sel(static_cast<size_t>(Hk));
    if (ck.scores) {
      auto t = Clock::now();
      EnsureRepresentatives(layer, kv, init_blocks, ctx_end_block, a.scale, rel);
      times_.reps += Since(t);
      t = Clock::now();
      std::vector<std::vector<PlanExecutor::Scored>> top;
      const bool rescore = ck.rescore > cfg_.topk;
      std::vector<float> qs;  // re-ranking's combined queries (qa + qb), or empty: from sq
      if (exec_->ChunkTop(layer, ca, &top)) {
        // The executor's shortlist of each row (ChunkShortlist: the row's topk, or the
        // rescore_blocks to re-rank), ranked here.
        NEEDLE_CHECK(top.size() ==
                     (cfg_.select == SelectMode::kLayer ? 1 : static_cast<size_t>(Hk)));
        if (rescore) {
          const bool have = exec_->ChunkQueries(layer, ca, qa.data(), qb.data());
          NEEDLE_CHECK(have);  // (an executor that shortlists a chunk has its sums)
          qs = CombineQuerySums(qa, qb);
        }
        const ScoreArgs sa{nullptr, ca.T, a.heads, Hk, a.head_dim, nullptr, 0};
        for (size_t r = 0; r < top.size(); ++r) {
          std::vector<float> rs;
          std::vector<int32_t> ri;
          for (const auto& e : top[r]) rs.push_back(e.score), ri.push_back(e.block);
          sel[r] = RankCandidates(rs.data(), ri.data(), static_cast<int64_t>(ri.size()), cfg_.topk,
                                  ck.rescore, sa, qs.data(), kv, rel,
                                  top.size() == 1 ? -1 : static_cast<int64_t>(r), tc_);
        }
        if (top.size() == 1)
          for (auto& hb : sel) hb = sel[0];
      } else {
        std::vector<int32_t> all(static_cast<size_t>(ctx_end_block - init_blocks));
        std::iota(all.begin(), all.end(), static_cast<int32_t>(init_blocks));
        const int64_t n = static_cast<int64_t>(all.size());
        std::vector<float> sc(static_cast<size_t>(Hk * n));
        // Scored with every query of the chunk (scoring sums them), selected as decode selects;
        // with the remap, where it will attend them (SparseConfig::RemapScoreShift). The executor
        // may have summed the queries where they are.
        const float* sq = nullptr;
        if (exec_->ChunkQueries(layer, ca, qa.data(), qb.data())) {
          fast::ScoreGrouped(reps_, layer,
                             ScoreArgs{sq, ca.T, a.heads, Hk, a.head_dim, all.data(), n}, qa, qb,
                             sc.data(), tc_);
          if (rescore) qs = CombineQuerySums(qa, qb);
        } else {
          sq = cfg_.pos_remap ? ScoringQueries(cq, ca.T, a, lb) : cq;
          fast::ScoreBlocks(reps_, layer,
                            ScoreArgs{sq, ca.T, a.heads, Hk, a.head_dim, all.data(), n}, sc.data(),
                            tc_);
        }
        const ScoreArgs sa{sq, ca.T, a.heads, Hk, a.head_dim, all.data(), n};
        const float* qsp = qs.empty() ? nullptr : qs.data();
        if (cfg_.select == SelectMode::kLayer) {
          SumOverHeads(sc.data(), Hk, n);
          sel[0] = RankCandidates(sc.data(), all.data(), n, cfg_.topk, ck.rescore, sa, qsp, kv, rel,
                                  -1, tc_);
          for (auto& hb : sel) hb = sel[0];
        } else {
          for (int64_t h = 0; h < Hk; ++h)
            sel[h] = RankCandidates(sc.data() + h * n, all.data(), n, cfg_.topk, ck.rescore, sa,
                                    qsp, kv, rel, h, tc_);
        }
      }
      times_.select += Since(t);
    }
    if (step_.last_of_call && c0 + ca.T == a.pos0 + a.T) {  // the prompt's last query's chunk
      Watch(layer, sel, cfg_.init_end(), lb, false);
      // (Alone, unless one chunk holds the whole prompt: then it has no Context to select.)
      if (ck.scores) last_query_sel_ = sel;
    }
    float* c_out = out + (c0 - a.pos0) * HD;
    float* c_lse = lse != nullptr ? lse + (c0 - a.pos0) * a.heads : nullptr;
    if (exec_->PrefillChunk(layer, cq, ca, kv, PlanExecutor::Chunk{cfg_.init_end(), lb, &sel, rel},
                            c_out, c_lse))
      continue;
    // Spans of each (token, KV head): Initial, the selected blocks, then Local + the chunk
    // (remapped: the rotations depend on the chunk and the head, not on the token).
    spans.offsets.assign(1, 0);
    spans.spans.clear();
    spans.rot.clear();
    spans.rot_table.clear();
    std::map<int64_t, int32_t> rows;
    for (int64_t t = 0; t < ca.T; ++t) {
      const int64_t p = c0 + t;
      for (int64_t h = 0; h < Hk; ++h)
        AppendQuerySpans(cfg_.init_end(), sel[h], B, lb, p, rel, a.head_dim, &spans, &rows);
    }
    if (!exec_->Spans(layer, cq, ca, kv, spans, c_out, c_lse))
      Fail("--prefill sparse: this placement of the KV cache cannot attend a prompt sparsely yet");
  }
}

}  // namespace needle
