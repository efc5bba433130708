// The hybrid engine's block selection on the GPU, where the representatives are kept: the
// planner's PlanExecutor::Score and ScoreTop (sparse_attn/sparse_attention.h) carried out with
// cuda::GroupQueries, ScoreBlocks and TopBlocks (block_select.h). Representatives go up as the
// planner (re)computes them (their stamps); only scores or the shortlist come back.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "engine/cuda/device_buffer.h"
#include "engine/cuda/device_plan.h"
#include "engine/cuda/pinned_host.h"
#include "engine/model/config.h"
#include "sparse_attn/sparse_attention.h"

namespace needle::cuda {

class GpuBlockScorer {
 public:
  // reps: the planner's store (its capacity sizes the GPU copy); stream: the model's.
  GpuBlockScorer(const ModelConfig& m, const RepresentativeStore& reps, cudaStream_t stream);
  ~GpuBlockScorer();
  GpuBlockScorer(const GpuBlockScorer&) = delete;
  GpuBlockScorer& operator=(const GpuBlockScorer&) = delete;

  // PlanExecutor::Score and ScoreTop for the decode query q_dev (device [heads, D]); both wait for
  // the stream. false: candidates that are not one range of blocks (the planner scores them).
  bool Score(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a, const float* q_dev,
             float* scores);
  bool ScoreTop(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a, bool sum_heads,
                int64_t want, const float* q_dev,
                std::vector<std::vector<PlanExecutor::Scored>>* top);
  // Decode: queues the shortlist the planner will ask `layer` for (SparseAttention::
  // WillShortlist), so that the wait for the query serves it too; ScoreTop then reads it when
  // no representative of a candidate changed since.
  void QueueEarly(int64_t layer, SparseAttention& planner, const AttnArgs& a, const float* q_dev);
  // The representatives' uploads so far: calls that checked every candidate's stamp, blocks
  // copied, host seconds spent (Upload).
  struct UploadCounts {
    int64_t checks = 0, blocks = 0;
    double host_s = 0;
  };
  UploadCounts counts;
  // PlanExecutor::PlanDecode's shortlist, left on the GPU: the `want` best of candidates
  // [first, first + n) for the query q_dev, queued into *vals, *ids (device [rows][want],
  // TopBlocks'; valid until the next call). mark: called with 0 once the representatives are
  // current on the GPU, 1 between the scoring and the top-k (a profile's marks). select (not
  // null): the selection from that shortlist too, in the top-k's kernel where it applies
  // (TopBlocksSelect), after retain (not null: the retention it reads, pending from the layer's
  // previous step); true when they were queued so (else the caller's to queue).
  bool QueueDeviceShortlist(int64_t layer, const RepresentativeStore& reps, int64_t first,
                            int64_t n, bool sum_heads, int64_t want, const float* q_dev,
                            const float** vals, const int32_t** ids,
                            const std::function<void(int)>& mark = {},
                            const SelectArgs* select = nullptr, const RetainArgs* retain = nullptr);
  // A sparse prefill chunk's shortlist (PlanExecutor::ChunkTop): queues the scores of candidates
  // [first, first + n) with the chunk's combined queries qa, qb (device [kv_heads, D],
  // GroupChunkQueries') and the `want` best of each row (sum_heads: one row) into vals, ids
  // (device [rows][want], TopBlocks'). The candidates' representatives must be current on the
  // host (SparseAttention::PrefillChunkScoring).
  void QueueChunkShortlist(int64_t layer, const RepresentativeStore& reps, int64_t first, int64_t n,
                           bool sum_heads, int64_t want, const float* qa, const float* qb,
                           float* vals, int32_t* ids);

 private:
  // The GPU's copy of `layer`'s representatives, candidates [first, first + n) made current.
  const uint8_t* Upload(int64_t layer, const RepresentativeStore& reps, int64_t first, int64_t n);
  float* ScoreOnGpu(int64_t layer, const RepresentativeStore& reps, int64_t first, int64_t n,
                    size_t extra_floats, const float* q_dev,
                    const std::function<void()>& uploaded = {});
  void QueueShortlist(int64_t layer, const RepresentativeStore& reps, int64_t first, int64_t n,
                      bool sum_heads, int64_t want, const float* q_dev);
  void ReadShortlist(int64_t n, bool sum_heads, int64_t want,
                     std::vector<std::vector<PlanExecutor::Scored>>* top);

  int64_t heads_, kv_heads_, head_dim_;
  cudaStream_t stream_;
  uint8_t* reps_dev_ = nullptr;  // [layer][block][kv_head][R][D], the store's layout
  std::vector<std::vector<uint32_t>> uploaded_;  // [layer][block]: stamp of the GPU's copy
  // [layer]: the candidates [up_first, up_end) were all current on the GPU at up_version.
  std::vector<uint64_t> up_version_;
  std::vector<int64_t> up_first_, up_end_;
  GrowBuffer score_buf_{"hybrid block scores"}, chunk_scores_{"hybrid chunk scores"};
  PinnedFloats top_pin_;
  // The shortlist queued early (QueueEarly) and what it was for; layer -1: none.
  int64_t early_layer_ = -1, early_first_ = 0, early_n_ = 0, early_want_ = 0;
  uint64_t early_version_ = 0;
  bool early_sum_ = false;
};

}  // namespace needle::cuda
