#include "engine/cuda/chunk_prefill.h"

#include <algorithm>
#include <map>

#include "engine/base/error.h"
#include "engine/cuda/block_select.h"
#include "engine/cuda/context_gather.h"
#include "engine/cuda/cuda_check.h"
#include "sparse_attn/plan.h"

namespace needle {

ChunkPrefill::ChunkPrefill(KVCache& staging, int64_t first_extra, cuda::GpuBlockScorer& scorer,
                           cudaStream_t stream)
    : staging_(staging), x0_(first_extra), scorer_(scorer), stream_(stream) {}

void ChunkPrefill::QueueScoringQueries(int64_t layer, const SparseAttention& planner,
                                       const std::vector<SparseAttention::ChunkSpec>& chunks,
                                       const float* q, const AttnArgs& a, bool quest) {
  const int64_t D = a.head_dim, n = static_cast<int64_t>(chunks.size());
  group_floats_ = a.kv_heads * D;
  starts_.clear();
  tops_at_.clear();
  tops_n_.clear();
  std::vector<int32_t> spec;  // [n][3]: first row, tokens, rotation row
  std::vector<float> rows;
  std::map<int64_t, int32_t> row_of;  // shift -> rotation row
  for (const auto& ck : chunks) {
    starts_.push_back(ck.c0);
    int32_t r = -1;
    if (ck.score_shift != 0) {
      NEEDLE_CHECK(a.inv_freq != nullptr);
      r = SharedRotationRow(ck.score_shift, a.inv_freq, D, &rows, &row_of);
    }
    spec.insert(spec.end(), {static_cast<int32_t>(ck.c0 - a.pos0), static_cast<int32_t>(ck.n), r});
  }
  if (n == 0) return;
  int32_t* d_spec = ints_.Get<int32_t>(spec.size());
  NEEDLE_CUDA_CHECK(cudaMemcpyAsync(d_spec, spec.data(), spec.size() * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, stream_));
  float* d_rows = nullptr;
  if (!rows.empty()) {
    d_rows = rows_.Get<float>(rows.size());
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(d_rows, rows.data(), rows.size() * sizeof(float),
                                      cudaMemcpyHostToDevice, stream_));
  }
  const size_t total = static_cast<size_t>(n * 2 * group_floats_);
  float* d_out = grouped_.Get<float>(total);
  cuda::GroupChunkQueries(q, d_spec, n, a.heads, a.kv_heads, D, quest, d_rows, d_out, stream_);
  NEEDLE_CUDA_CHECK(cudaMemcpyAsync(grouped_pin_.Get(total), d_out, total * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream_));
  // The shortlists of the chunks whose candidates are ready, scored with the sums above.
  bool sum_heads = false;
  planner.ChunkShortlist(&top_want_, &sum_heads);
  top_rows_ = sum_heads ? 1 : a.kv_heads;
  tops_at_.assign(static_cast<size_t>(n), -1);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    tops_n_.push_back(chunks[i].cand_end - chunks[i].cand_first);
    if (chunks[i].executor_top) tops_at_[i] = m++;
  }
  if (m == 0) return;
  const int64_t per = 2 * top_rows_ * top_want_;  // floats of one shortlist
  float* d_tops = tops_.Get<float>(static_cast<size_t>(m * per));
  for (int64_t i = 0; i < n; ++i) {
    const auto& ck = chunks[i];
    if (tops_at_[i] < 0) continue;
    const float* qa = d_out + i * 2 * group_floats_;
    float* vals = d_tops + tops_at_[i] * per;
    scorer_.QueueChunkShortlist(layer, planner.representatives(), ck.cand_first,
                                ck.cand_end - ck.cand_first, sum_heads, top_want_, qa,
                                qa + group_floats_, vals,
                                reinterpret_cast<int32_t*>(vals + top_rows_ * top_want_));
  }
  NEEDLE_CUDA_CHECK(cudaMemcpyAsync(tops_pin_.Get(static_cast<size_t>(m * per)), d_tops,
                                    static_cast<size_t>(m * per) * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream_));
}

bool ChunkPrefill::ChunkTop(const AttnArgs& a,
                            std::vector<std::vector<PlanExecutor::Scored>>* top) {
  const auto it = std::find(starts_.begin(), starts_.end(), a.pos0);
  if (it == starts_.end() || tops_at_[it - starts_.begin()] < 0) return false;
  const int64_t per = 2 * top_rows_ * top_want_;
  const float* vals = tops_pin_.Get(0) + tops_at_[it - starts_.begin()] * per;
  const auto* ids = reinterpret_cast<const int32_t*>(vals + top_rows_ * top_want_);
  // (The first min(want, candidates) of each row are filled.)
  top->assign(static_cast<size_t>(top_rows_), {});
  const int64_t k = std::min(top_want_, tops_n_[it - starts_.begin()]);
  for (int64_t r = 0; r < top_rows_; ++r)
    for (int64_t j = 0; j < k; ++j)
      (*top)[r].push_back({vals[r * top_want_ + j], ids[r * top_want_ + j]});
  return true;
}

bool ChunkPrefill::ChunkQueries(const AttnArgs& a, float* qa, float* qb) {
  const auto it = std::find(starts_.begin(), starts_.end(), a.pos0);
  if (it == starts_.end()) return false;
  const float* g = grouped_pin_.Get(0) + (it - starts_.begin()) * 2 * group_floats_;
  std::copy_n(g, group_floats_, qa);
  std::copy_n(g + group_floats_, group_floats_, qb);
  return true;
}

void ChunkPrefill::Attend(const float* q, int64_t q_pos0, const AttnArgs& a,
                          const PlanExecutor::Chunk& ch, float* out, float* lse, int sm,
                          cuda::AttnWorkspace& ws) {
  const int64_t B = staging_.shape().block_size, Hk = staging_.shape().kv_heads;
  LayoutChunk(
      ch, a.pos0, a.T, B, Hk, a.head_dim, [this](int64_t b) { return staging_.SlotOf(0, b); }, x0_,
      &layout_);
  // One upload: [table][src][dst][rot] int32, then the rotation rows (f32), from page-locked
  // memory (this chunk's buffer, last used by the previous micro-batch, which has finished).
  const size_t nt = layout_.table.size(), nc = layout_.src.size(), nr = layout_.rot_table.size();
  const size_t ni = nt + 3 * nc;
  if (next_ == up_.size()) up_.push_back(std::make_unique<cuda::PinnedFloats>());
  float* up = up_[next_++]->Get(ni + nr);
  auto* ui = reinterpret_cast<int32_t*>(up);
  std::copy(layout_.table.begin(), layout_.table.end(), ui);
  std::copy(layout_.src.begin(), layout_.src.end(), ui + nt);
  std::copy(layout_.dst.begin(), layout_.dst.end(), ui + nt + nc);
  std::copy(layout_.rot.begin(), layout_.rot.end(), ui + nt + 2 * nc);
  std::copy(layout_.rot_table.begin(), layout_.rot_table.end(), up + ni);
  float* dev = ints_.Get<float>(ni + nr);
  NEEDLE_CUDA_CHECK(
      cudaMemcpyAsync(dev, up, (ni + nr) * sizeof(float), cudaMemcpyHostToDevice, stream_));
  const auto* ints = reinterpret_cast<const int32_t*>(dev);
  if (nc > 0) {
    const float* rows = nr > 0 ? dev + ni : nullptr;
    cuda::GatherRotate(staging_.BlockData(0, false, 0), staging_.BlockData(0, true, 0),
                       staging_.shape().dtype, ints + nt, ints + nt + nc, ints + nt + 2 * nc, rows,
                       static_cast<int64_t>(nc), B, a.head_dim, stream_);
  }
  KVLayerView v = staging_.Layer(0);
  v.table = ints;
  AttnArgs a2 = a;
  a2.pos0 = layout_.pos0;
  v.n_tokens = a2.pos0 + a2.T;
  cuda::Attention(q + (a.pos0 - q_pos0) * a.heads * a.head_dim, v, a2, out, lse, sm, ws, stream_);
}

}  // namespace needle
