#include "engine/cuda/hybrid_select.h"

#include <algorithm>

#include "engine/base/seconds.h"
#include "engine/cuda/block_select.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/kernels.h"

namespace needle::cuda {

namespace {
bool IsRange(const ScoreArgs& a) {  // (the candidates are ascending)
  return a.n <= 0 || a.blocks[a.n - 1] - a.blocks[0] == a.n - 1;
}
}  // namespace

GpuBlockScorer::GpuBlockScorer(const ModelConfig& m, const RepresentativeStore& r,
                               cudaStream_t stream)
    : heads_(m.num_heads), kv_heads_(m.num_kv_heads), head_dim_(m.head_dim), stream_(stream) {
  reps_dev_ = static_cast<uint8_t*>(DeviceAlloc(
      r.BlockBytes() * static_cast<size_t>(r.max_blocks() * m.num_layers), "representatives"));
  uploaded_.assign(static_cast<size_t>(m.num_layers),
                   std::vector<uint32_t>(static_cast<size_t>(r.max_blocks()), 0));
  up_version_.assign(static_cast<size_t>(m.num_layers), ~uint64_t{0});
  up_first_.assign(static_cast<size_t>(m.num_layers), 0);
  up_end_.assign(static_cast<size_t>(m.num_layers), 0);
}

GpuBlockScorer::~GpuBlockScorer() {
  if (reps_dev_ != nullptr) cudaFree(reps_dev_);
}

// The representatives of candidate blocks [first, first + n) are copied to the GPU when the
// planner has (re)computed them since (their stamps).
const uint8_t* GpuBlockScorer::Upload(int64_t layer, const RepresentativeStore& reps, int64_t first,
                                      int64_t n) {
  const size_t bb = reps.BlockBytes();
  uint8_t* layer_dev = reps_dev_ + bb * static_cast<size_t>(layer * reps.max_blocks());
  std::vector<uint32_t>& up = uploaded_[layer];
  // Every candidate's copy is current when the layer has not changed since the candidates of a
  // range that covered these were checked: O(1) a step, not O(blocks).
  const auto t = Clock::now();
  const bool current = reps.version(layer) == up_version_[layer] && first >= up_first_[layer] &&
                       first + n <= up_end_[layer];
  if (!current) ++counts.checks;
  for (int64_t b = current ? first + n : first; b < first + n;) {
    if (up[b] == reps.stamp(layer, b)) {
      ++b;
      continue;
    }
    int64_t e = b;
    while (e < first + n && up[e] != reps.stamp(layer, e)) up[e] = reps.stamp(layer, e), ++e;
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(layer_dev + bb * static_cast<size_t>(b), reps.Block(layer, b),
                                      bb * static_cast<size_t>(e - b), cudaMemcpyHostToDevice,
                                      stream_));
    counts.blocks += e - b;
    b = e;
  }
  counts.host_s += Since(t);
  if (!current)
    up_version_[layer] = reps.version(layer), up_first_[layer] = first, up_end_[layer] = first + n;
  return layer_dev;
}

// Then one kernel scores every candidate against the query into device memory [kv_heads][n],
// followed by `extra_floats` for the caller.
float* GpuBlockScorer::ScoreOnGpu(int64_t layer, const RepresentativeStore& reps, int64_t first,
                                  int64_t n, size_t extra_floats, const float* q_dev,
                                  const std::function<void()>& uploaded) {
  const int64_t D = head_dim_, Hk = kv_heads_;
  const uint8_t* layer_dev = Upload(layer, reps, first, n);
  if (uploaded) uploaded();
  float* d = score_buf_.Get<float>(static_cast<size_t>(2 * Hk * D + Hk * n) + extra_floats);
  ScoreBlocksFromQuery(layer_dev, reps.storage(), reps.rows(), first, n, Hk, heads_ / Hk, D, q_dev,
                       reps.type() == ReprType::kQuest, d, d + Hk * D, d + 2 * Hk * D, stream_);
  return d + 2 * Hk * D;
}

void GpuBlockScorer::QueueChunkShortlist(int64_t layer, const RepresentativeStore& reps,
                                         int64_t first, int64_t n, bool sum_heads, int64_t want,
                                         const float* qa, const float* qb, float* vals,
                                         int32_t* ids) {
  const uint8_t* layer_dev = Upload(layer, reps, first, n);
  // (One scratch for every chunk: the stream orders each chunk's top-k before the next scores.)
  // (Sized for the longest candidate list at once: a growing prompt would reallocate it often.)
  float* sc = chunk_scores_.Get<float>(static_cast<size_t>(kv_heads_ * reps.max_blocks()));
  ScoreBlocks(layer_dev, reps.storage(), reps.rows(), first, n, kv_heads_, head_dim_, qa, qb, sc,
              stream_);
  TopBlocks(sc, kv_heads_, n, sum_heads, static_cast<int32_t>(first), want, vals, ids, stream_);
}

bool GpuBlockScorer::Score(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a,
                           const float* q_dev, float* scores) {
  if (a.n <= 0) return true;
  if (!IsRange(a)) return false;  // (candidates are a range today)
  const float* d = ScoreOnGpu(layer, reps, a.blocks[0], a.n, 0, q_dev);
  const size_t n = static_cast<size_t>(a.kv_heads * a.n);
  float* pin = top_pin_.Get(n);
  NEEDLE_CUDA_CHECK(cudaMemcpyAsync(pin, d, n * 4, cudaMemcpyDeviceToHost, stream_));
  NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::copy_n(pin, n, scores);
  return true;
}

// The shortlist of candidates [first, first + n) (TopBlocks), queued into top_pin_; read back by
// ReadShortlist after a stream synchronize.
void GpuBlockScorer::QueueShortlist(int64_t layer, const RepresentativeStore& reps, int64_t first,
                                    int64_t n, bool sum_heads, int64_t want, const float* q_dev) {
  const size_t out = static_cast<size_t>((sum_heads ? 1 : kv_heads_) * want);
  const float* vals = nullptr;
  const int32_t* ids = nullptr;  // (right after vals: one copy brings both)
  QueueDeviceShortlist(layer, reps, first, n, sum_heads, want, q_dev, &vals, &ids);
  NEEDLE_CUDA_CHECK(
      cudaMemcpyAsync(top_pin_.Get(2 * out), vals, 2 * out * 4, cudaMemcpyDeviceToHost, stream_));
}

bool GpuBlockScorer::QueueDeviceShortlist(int64_t layer, const RepresentativeStore& reps,
                                          int64_t first, int64_t n, bool sum_heads, int64_t want,
                                          const float* q_dev, const float** vals,
                                          const int32_t** ids, const std::function<void(int)>& mark,
                                          const SelectArgs* select, const RetainArgs* retain) {
  const size_t out = static_cast<size_t>((sum_heads ? 1 : kv_heads_) * want);
  float* d = ScoreOnGpu(layer, reps, first, n, 2 * out, q_dev, [&] {
    if (mark) mark(0);
  });
  if (mark) mark(1);
  float* v = d + kv_heads_ * n;
  auto* i = reinterpret_cast<int32_t*>(v + out);
  *vals = v, *ids = i;
  if (select != nullptr && TopBlocksSelect(d, kv_heads_, n, sum_heads, static_cast<int32_t>(first),
                                           want, v, i, *select, retain, stream_))
    return true;
  TopBlocks(d, kv_heads_, n, sum_heads, static_cast<int32_t>(first), want, v, i, stream_);
  return false;
}

void GpuBlockScorer::ReadShortlist(int64_t n, bool sum_heads, int64_t want,
                                   std::vector<std::vector<PlanExecutor::Scored>>* top) {
  const int64_t rows = sum_heads ? 1 : kv_heads_, k = std::min(want, n);
  const size_t out = static_cast<size_t>(rows * want);
  const float* pin = top_pin_.Get(2 * out);
  const auto* pid = reinterpret_cast<const int32_t*>(pin + out);
  top->assign(static_cast<size_t>(rows), {});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) (*top)[r].push_back({pin[r * want + i], pid[r * want + i]});
}

bool GpuBlockScorer::ScoreTop(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a,
                              bool sum_heads, int64_t want, const float* q_dev,
                              std::vector<std::vector<PlanExecutor::Scored>>* top) {
  if (a.n <= 0) {
    top->assign(sum_heads ? 1 : static_cast<size_t>(a.kv_heads), {});
    return true;
  }
  if (!IsRange(a)) return false;
  const int64_t first = a.blocks[0];
  // (No representative changed since: the layer's version is the one the early copy took.)
  const bool early = early_layer_ == layer && early_first_ == first && early_n_ == a.n &&
                     early_want_ == want && early_sum_ == sum_heads &&
                     early_version_ == reps.version(layer);
  early_layer_ = -1;
  if (!early) {
    QueueShortlist(layer, reps, first, a.n, sum_heads, want, q_dev);
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  ReadShortlist(a.n, sum_heads, want, top);
  return true;
}

void GpuBlockScorer::QueueEarly(int64_t layer, SparseAttention& planner, const AttnArgs& a,
                                const float* q_dev) {
  early_layer_ = -1;
  int64_t first = 0, end = 0, want = 0;
  bool sum = false;
  if (!planner.WillShortlist(layer, a, &first, &end, &want, &sum)) return;
  QueueShortlist(layer, planner.representatives(), first, end - first, sum, want, q_dev);
  early_layer_ = layer, early_first_ = first, early_n_ = end - first, early_want_ = want;
  early_version_ = planner.representatives().version(layer);
  early_sum_ = sum;
}

}  // namespace needle::cuda
