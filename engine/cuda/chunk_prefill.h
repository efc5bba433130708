// The hybrid engine's sparse prefill on the GPU (--prefill sparse, engine/cuda/hybrid.h): the
// planner (sparse_attn/) decides each chunk's blocks on the host as on the CPU; here
//   - the chunks' queries are combined for scoring where they are (GroupChunkQueries), so that
//     only their sums cross PCIe, not the micro-batch's queries;
//   - each chunk attends its keys from the staging layer (the prompt's layer, whole on the GPU)
//     through a block table, its moved keys copied and rotated first (chunk_layout.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/cuda/attention.h"
#include "engine/cuda/chunk_layout.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/hybrid_select.h"
#include "engine/cuda/pinned_host.h"
#include "kvcache/kv_cache.h"
#include "sparse_attn/sparse_attention.h"

namespace needle {

class ChunkPrefill {
 public:
  // staging: the GPU's staging layer (HybridStagingShape), its extra slots from first_extra on.
  // scorer: where the chunks marked executor_top are scored (the planner's representatives).
  ChunkPrefill(KVCache& staging, int64_t first_extra, cuda::GpuBlockScorer& scorer,
               cudaStream_t stream);

  // Queues, for every chunk of the micro-batch a (its queries q [a.T, heads, D], device), the
  // combined scoring queries and their copy to the host, and for the chunks marked executor_top
  // (SparseAttention::PrefillChunkScoring) the shortlist of their candidates: ChunkQueries and
  // ChunkTop answer after the stream's next synchronisation. quest: Quest's split by sign.
  void QueueScoringQueries(int64_t layer, const SparseAttention& planner,
                           const std::vector<SparseAttention::ChunkSpec>& chunks, const float* q,
                           const AttnArgs& a, bool quest);
  // The combined queries of chunk a (a.pos0: its first query), as PlanExecutor::ChunkQueries.
  bool ChunkQueries(const AttnArgs& a, float* qa, float* qb);
  // Chunk a's shortlist, as PlanExecutor::ChunkTop; false: not queued for it.
  bool ChunkTop(const AttnArgs& a, std::vector<std::vector<PlanExecutor::Scored>>* top);

  // After the stream's synchronisation that follows QueueScoringQueries: the micro-batch's chunks
  // may now be attended (their uploads reuse the previous micro-batch's page-locked buffers).
  void BeginMicroBatch() { next_ = 0; }
  // Attends chunk a: its queries are rows a.pos0 - q_pos0 .. of q (device, the micro-batch's,
  // row 0 at position q_pos0); out: device [a.T, heads, D]; lse: device [a.T, heads] or nullptr.
  void Attend(const float* q, int64_t q_pos0, const AttnArgs& a, const PlanExecutor::Chunk& ch,
              float* out, float* lse, int sm, cuda::AttnWorkspace& ws);

 private:
  KVCache& staging_;
  int64_t x0_;
  cuda::GpuBlockScorer& scorer_;
  cudaStream_t stream_;
  ChunkLayout layout_;
  cuda::GrowBuffer ints_{"hybrid chunk table"}, rows_{"hybrid chunk rotations"},
      grouped_{"hybrid chunk queries"};
  // QueueScoringQueries' chunks (first positions) and their sums [n][2][kv_heads][D], pinned.
  std::vector<int64_t> starts_;
  cuda::PinnedFloats grouped_pin_;
  int64_t group_floats_ = 0;  // kv_heads * D
  // The shortlists: chunk i's at tops_at_[i] (-1: none) in tops_pin_, [rows][want] scores then
  // [rows][want] ids (int32) each.
  std::vector<int64_t> tops_at_, tops_n_;  // tops_n_: chunk i's candidates
  int64_t top_rows_ = 0, top_want_ = 0;
  cuda::GrowBuffer tops_{"hybrid chunk shortlists"};
  cuda::PinnedFloats tops_pin_;
  // Each chunk's uploads ([table][src][dst][rot] int32, then rotation rows), page-locked so that
  // the copies are asynchronous: one buffer per chunk of a micro-batch, reused by the next one.
  std::vector<std::unique_ptr<cuda::PinnedFloats>> up_;
  size_t next_ = 0;
};

}  // namespace needle
