#include "engine/cuda/hybrid.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "engine/base/error.h"
#include "engine/cuda/attention.h"
#include "engine/cuda/block_select.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/kernels.h"

namespace needle {

namespace {
using Clock = std::chrono::steady_clock;

// Host scratch in pinned memory: the per-layer copies between GPU and host (q, partials, scores,
// lse) go by DMA at once instead of through the driver's staging buffer. Contents are dropped when
// it grows; a copy into or out of it must be waited for before it is reused.
class PinnedFloats {
 public:
  PinnedFloats() = default;
  PinnedFloats(const PinnedFloats&) = delete;
  PinnedFloats& operator=(const PinnedFloats&) = delete;
  ~PinnedFloats() {
    if (p_ != nullptr) cudaFreeHost(p_);
  }
  float* Get(size_t n) {
    if (n > n_) {
      if (p_ != nullptr) NEEDLE_CUDA_CHECK(cudaFreeHost(p_));
      p_ = nullptr;
      void* p = nullptr;
      NEEDLE_CUDA_CHECK(cudaMallocHost(&p, std::max<size_t>(n, 1) * sizeof(float)));
      p_ = static_cast<float*>(p), n_ = n;
    }
    return p_;
  }

 private:
  float* p_ = nullptr;
  size_t n_ = 0;
};

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}
}  // namespace

struct HybridAttention::Impl final : PlanExecutor {
  Impl(const ModelConfig& m_, const SparseConfig& c_, Backend& gpu_, ThreadingContext& tc_,
       int64_t max_tokens, DType kv, size_t host_limit, bool residual_on_gpu_)
      : m(m_),
        c(c_),
        tc(tc_),
        stream(CudaBackendStream(gpu_)),
        cpu(MakeCpuBackend(tc_, false)),
        host(HostShape(m_, c_, max_tokens, kv), host_limit),
        staging(KVCacheShape(1, m_.num_kv_heads, m_.head_dim, max_tokens, c_.block_size, kv), 0,
                gpu_.kv_memory()),
        planner(m_, c_, *cpu, tc_, max_tokens, kv),
        residual_on_gpu(residual_on_gpu_) {
    if (kv == DType::kI8)
      Fail("--kv-type int8: the hybrid engine's GPU kernels read f32, f16 or bf16 caches");
    planner.set_executor(this);
    const RepresentativeStore& r = planner.representatives();
    reps_dev = static_cast<uint8_t*>(cuda::DeviceAlloc(
        r.BlockBytes() * static_cast<size_t>(r.max_blocks() * m.num_layers), "representatives"));
    uploaded.assign(static_cast<size_t>(m.num_layers),
                    std::vector<uint32_t>(static_cast<size_t>(r.max_blocks()), 0));
    up_version.assign(static_cast<size_t>(m.num_layers), ~uint64_t{0});
    up_first.assign(static_cast<size_t>(m.num_layers), 0);
    up_end.assign(static_cast<size_t>(m.num_layers), 0);
    int dev = 0;
    NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
    NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
    NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&layer_start, cudaEventDisableTiming));
  }

  ~Impl() override {
    if (reps_dev != nullptr) cudaFree(reps_dev);
    if (layer_start != nullptr) cudaEventDestroy(layer_start);
  }

  // The host cache holds the sparse layers only: the dense layers' blocks are never written, and
  // an anonymous mapping commits no memory for them.
  static KVCacheShape HostShape(const ModelConfig& m, const SparseConfig& c, int64_t ctx,
                                DType kv) {
    return KVCacheShape(m.num_layers, m.num_kv_heads, m.head_dim, ctx, c.block_size, kv);
  }

  bool Dense(int64_t layer) const { return HybridDenseLayer(m, c, layer); }
  // Host time spent inside the executor (not the planner's own).
  double ExecutorTime() const { return stats.cpu_attend + stats.copies + stats.gpu_wait; }
  void Sync(double* into) {
    const auto t = Clock::now();
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (into != nullptr) *into += Since(t);
  }
  void D2H(void* dst, const void* src, size_t bytes) {
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  }
  void H2D(void* dst, const void* src, size_t bytes) {
    NEEDLE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  }
  // Copies blocks [b0, b1) of one layer between caches of the same shape per block (K and V;
  // consecutive slots on both sides go as one copy).
  void CopyBlocks(const KVCache& src, int64_t sl, KVCache& dst, int64_t dl, int64_t b0, int64_t b1,
                  cudaMemcpyKind kind) {
    const size_t bb = src.BlockBytes();
    for (int64_t b = b0; b < b1;) {
      const int32_t s0 = src.SlotOf(sl, b), d0 = dst.SlotOf(dl, b);
      NEEDLE_CHECK(s0 >= 0 && d0 >= 0);
      int64_t n = 1;
      while (b + n < b1 && src.SlotOf(sl, b + n) == s0 + n && dst.SlotOf(dl, b + n) == d0 + n) ++n;
      for (bool v : {false, true})
        NEEDLE_CUDA_CHECK(cudaMemcpyAsync(dst.BlockData(dl, v, d0), src.BlockData(sl, v, s0),
                                          bb * static_cast<size_t>(n), kind, stream));
      b += n;
    }
  }

  // --- prompts: layer by layer; a sparse layer's keys in the staging layer ----------------------
  void StartPromptLayer(int64_t layer) {
    Sync(nullptr);  // earlier layers' work on the staging layer is done
    staging.Clear();
    const int64_t p0 = step.call_pos0, B = c.block_size;
    if (p0 == 0) return;
    // A prompt that continues a sequence: its earlier keys come back from the host, once per
    // layer and prompt.
    staging.AssignBlocks(0, 0, p0);
    CopyBlocks(host, layer, staging, 0, 0, (p0 + B - 1) / B, cudaMemcpyHostToDevice);
  }

  void PromptAttend(int64_t layer, const AttnArgs& a) {
    const int64_t B = c.block_size, end = a.pos0 + a.T, call_end = step.call_pos0 + step.call_T;
    // This micro-batch's blocks to the host (the planner computes their representatives there).
    host.AssignBlocks(layer, a.pos0, a.T);
    CopyBlocks(staging, 0, host, layer, a.pos0 / B, (end + B - 1) / B, cudaMemcpyDeviceToHost);
    // The planner reads the queries of the prompt's observation window and its last query.
    const int64_t HD = a.heads * a.head_dim;
    float* q_host = q_pin.Get(static_cast<size_t>(a.T * HD));
    if (call_end - end < c.obs_window || step.last_of_call) {
      const int64_t t0 = std::max<int64_t>(0, a.T - c.obs_window);
      D2H(q_host + t0 * HD, q_dev + t0 * HD, static_cast<size_t>((a.T - t0) * HD) * 4);
    }
    Sync(nullptr);
    planner.Attend(layer, q_host, a, host, out_dev);
    if (step.last_of_call) {
      // The first decode step's Initial and Local blocks go to the layer's ring.
      const int64_t init_b = std::min(c.init_end() / B, (end + B - 1) / B);
      const int64_t local_b = c.LocalBegin(end) / B, last_b = (end + B - 1) / B;
      for (int64_t b = 0; b < init_b; ++b) model_cache->AssignBlocks(layer, b * B, 1);
      for (int64_t b = std::max(local_b, init_b); b < last_b; ++b)
        model_cache->AssignBlocks(layer, b * B, 1);
      CopyBlocks(staging, 0, *model_cache, layer, 0, init_b, cudaMemcpyDeviceToDevice);
      CopyBlocks(staging, 0, *model_cache, layer, std::max(local_b, init_b), last_b,
                 cudaMemcpyDeviceToDevice);
    }
  }

  // --- decode ----------------------------------------------------------------------------------
  // The view of a sparse layer's ring as one causal sequence: Initial blocks, then the Local
  // blocks, renumbered (the keys were rotated at their true positions when written). *a2: the
  // query's arguments over it.
  KVLayerView WindowView(int64_t layer, const AttnArgs& a, AttnArgs* a2) {
    const int64_t B = c.block_size, p = a.pos0, ie = c.init_end(), lb = c.LocalBegin(p);
    const int64_t shift = lb - ie;          // keys skipped between Initial and Local (>= 0)
    const int64_t n = (p - shift) / B + 1;  // blocks of the view
    if (lb != table_lb || p / B != table_pb) {
      table_host.resize(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) {
        const int64_t b = j < ie / B ? j : lb / B + (j - ie / B);
        table_host[j] = model_cache->SlotOf(layer, b);
        NEEDLE_CHECK(table_host[j] >= 0);
      }
      int32_t* d = table_dev.Get<int32_t>(table_host.size());
      H2D(d, table_host.data(), table_host.size() * sizeof(int32_t));
      table_lb = lb, table_pb = p / B;
    }
    KVLayerView v = model_cache->Layer(layer);
    v.table = table_dev.Get<int32_t>(table_host.size());
    *a2 = a;
    a2->pos0 = p - shift;
    return v;
  }

  // The new token's K/V row of a sparse layer, from its ring to the host cache: copied to pinned
  // memory with the query (a copy into the pageable cache itself would block the host until the
  // GPU got there), then into the cache by RowToCache once the host has waited.
  void RowToPinned(int64_t layer, int64_t p) {
    host.AssignBlocks(layer, p, 1);
    // (Block tables are read on the host: a device view's table is device memory.)
    const int64_t B = c.block_size, b = p / B;
    const size_t es = DTypeSize(host.shape().dtype);
    const size_t pitch = static_cast<size_t>(B * m.head_dim) * es;  // one KV head's block
    const size_t width = static_cast<size_t>(m.head_dim) * es,
                 off = static_cast<size_t>(p % B) * width;
    const int32_t ds = model_cache->SlotOf(layer, b);
    NEEDLE_CHECK(ds >= 0);
    const size_t Hk = static_cast<size_t>(m.num_kv_heads);
    auto* pin = reinterpret_cast<uint8_t*>(row_pin.Get((2 * Hk * width + 3) / 4));
    for (int v : {0, 1})
      NEEDLE_CUDA_CHECK(cudaMemcpy2DAsync(pin + static_cast<size_t>(v) * Hk * width, width,
                                          model_cache->BlockData(layer, v != 0, ds) + off, pitch,
                                          width, Hk, cudaMemcpyDeviceToHost, stream));
  }
  void RowToCache(int64_t layer, int64_t p) {
    const int64_t B = c.block_size;
    const size_t es = DTypeSize(host.shape().dtype);
    const size_t pitch = static_cast<size_t>(B * m.head_dim) * es;
    const size_t width = static_cast<size_t>(m.head_dim) * es,
                 off = static_cast<size_t>(p % B) * width;
    const int32_t hs = host.SlotOf(layer, p / B);
    NEEDLE_CHECK(hs >= 0);
    const size_t Hk = static_cast<size_t>(m.num_kv_heads);
    const auto* pin = reinterpret_cast<const uint8_t*>(row_pin.Get((2 * Hk * width + 3) / 4));
    for (int v : {0, 1})
      for (size_t h = 0; h < Hk; ++h)
        std::memcpy(host.BlockData(layer, v != 0, hs) + off + h * pitch,
                    pin + (static_cast<size_t>(v) * Hk + h) * width, width);
  }

  // --- PlanExecutor ----------------------------------------------------------------------------
  void Dense(int64_t layer, const float*, const AttnArgs& a, const KVLayerView&, float*,
             float* lse) override {
    AttnArgs a2 = a;
    KVLayerView v;
    if (step.call_T > 1)
      v = Dense(layer) ? model_cache->Layer(layer) : staging.Layer(0);
    else
      v = Dense(layer) ? model_cache->Layer(layer) : WindowView(layer, a, &a2);
    float* lse_dev =
        lse != nullptr ? lse_g.Get<float>(static_cast<size_t>(a.T * a.heads)) : nullptr;
    cuda::Attention(q_dev, v, a2, out_dev, lse_dev, sm, ws, stream);
    if (lse != nullptr) {
      const auto t = Clock::now();
      float* pin = lse_pin.Get(static_cast<size_t>(a.T * a.heads));
      D2H(pin, lse_dev, static_cast<size_t>(a.T * a.heads) * 4);
      Sync(nullptr);
      std::copy_n(pin, a.T * a.heads, lse);
      if (step.call_T == 1) stats.gpu_wait += Since(t);
    }
  }

  bool Planned(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
               const LayerPlan& plan, float*, float* lse,
               std::vector<std::vector<float>>* mass) override {
    const int64_t HD = a.heads * a.head_dim;
    // GPU: Initial + Local, queued first so that it runs while the CPU attends.
    AttnArgs a2;
    const KVLayerView v = WindowView(layer, a, &a2);
    float* g = gpu_part.Get<float>(static_cast<size_t>(2 * (HD + a.heads) + a.heads));
    float *g_out = g, *g_lse = g + HD, *c_out = g + HD + a.heads, *c_lse = c_out + HD;
    float* m_lse = c_lse + a.heads;
    cuda::Attention(q_dev, v, a2, g_out, g_lse, sm, ws, stream);
    // CPU: the selected Context blocks.
    auto t = Clock::now();
    float* cpu_part = part_pin.Get(static_cast<size_t>(HD + 2 * a.heads));
    fast::AttendBlocks(q, kv, a, plan.blocks, cpu_part, cpu_part + HD, &block_stats, tc);
    stats.cpu_attend += Since(t);
    t = Clock::now();
    H2D(c_out, cpu_part, static_cast<size_t>(HD + a.heads) * 4);
    cuda::MergeAttention(g_out, g_lse, c_out, c_lse, a.heads, a.head_dim, out_dev, m_lse, stream);
    D2H(cpu_part + HD + a.heads, m_lse, static_cast<size_t>(a.heads) * 4);
    stats.copies += Since(t);
    Sync(&stats.gpu_wait);
    std::copy_n(cpu_part + HD + a.heads, a.heads, lse);
    if (mass == nullptr) return false;
    fast::BlockMassFromStats(block_stats, lse, a.heads / a.kv_heads, plan.blocks, mass);
    return true;
  }

  // Scores on the GPU: the representatives of candidate blocks [first, first + n) are copied
  // there when the planner has (re)computed them since (their stamps), then one kernel scores
  // every candidate against the query on the GPU (q_dev) into device memory [kv_heads][n],
  // followed by `extra_floats` for the caller.
  float* ScoreOnGpu(int64_t layer, const RepresentativeStore& reps, int64_t first, int64_t n,
                    size_t extra_floats) {
    const int64_t D = m.head_dim, Hk = m.num_kv_heads;
    const size_t bb = reps.BlockBytes();
    uint8_t* layer_dev = reps_dev + bb * static_cast<size_t>(layer * reps.max_blocks());
    std::vector<uint32_t>& up = uploaded[layer];
    // Every candidate's copy is current when the layer has not changed since the candidates of a
    // range that covered these were checked: O(1) a step, not O(blocks).
    const bool current = reps.version(layer) == up_version[layer] && first >= up_first[layer] &&
                         first + n <= up_end[layer];
    for (int64_t b = current ? first + n : first; b < first + n;) {
      if (up[b] == reps.stamp(layer, b)) {
        ++b;
        continue;
      }
      int64_t e = b;
      while (e < first + n && up[e] != reps.stamp(layer, e)) up[e] = reps.stamp(layer, e), ++e;
      H2D(layer_dev + bb * static_cast<size_t>(b), reps.Block(layer, b),
          bb * static_cast<size_t>(e - b));
      b = e;
    }
    if (!current)
      up_version[layer] = reps.version(layer), up_first[layer] = first, up_end[layer] = first + n;
    float* d = score_buf.Get<float>(static_cast<size_t>(2 * Hk * D + Hk * n) + extra_floats);
    cuda::GroupQueries(q_dev, m.num_heads, Hk, D, reps.type() == ReprType::kQuest, d, d + Hk * D,
                       stream);
    cuda::ScoreBlocks(layer_dev, reps.storage(), reps.rows(), first, n, Hk, D, d, d + Hk * D,
                      d + 2 * Hk * D, stream);
    return d + 2 * Hk * D;
  }
  static bool IsRange(const ScoreArgs& a) {  // (the candidates are ascending)
    return a.n <= 0 || a.blocks[a.n - 1] - a.blocks[0] == a.n - 1;
  }

  bool Score(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a,
             float* scores) override {
    if (a.n <= 0) return true;
    if (!IsRange(a)) return false;  // (candidates are a range today)
    const float* d = ScoreOnGpu(layer, reps, a.blocks[0], a.n, 0);
    const size_t n = static_cast<size_t>(a.kv_heads * a.n);
    float* pin = top_pin.Get(n);
    D2H(pin, d, n * 4);
    Sync(nullptr);
    std::copy_n(pin, n, scores);
    return true;
  }

  // The shortlist of candidates [first, first + n) (cuda::TopBlocks), queued into top_pin; read
  // back by ReadShortlist after a stream synchronize.
  void QueueShortlist(int64_t layer, const RepresentativeStore& reps, int64_t first, int64_t n,
                      bool sum_heads, int64_t want) {
    const int64_t rows = sum_heads ? 1 : m.num_kv_heads;
    const size_t out = static_cast<size_t>(rows * want);
    float* d = ScoreOnGpu(layer, reps, first, n, 2 * out);
    float* vals = d + m.num_kv_heads * n;
    auto* ids = reinterpret_cast<int32_t*>(vals + out);
    cuda::TopBlocks(d, m.num_kv_heads, n, sum_heads, static_cast<int32_t>(first), want, vals, ids,
                    stream);
    D2H(top_pin.Get(2 * out), vals, 2 * out * 4);
  }
  void ReadShortlist(int64_t n, bool sum_heads, int64_t want,
                     std::vector<std::vector<Scored>>* top) {
    const int64_t rows = sum_heads ? 1 : m.num_kv_heads, k = std::min(want, n);
    const size_t out = static_cast<size_t>(rows * want);
    const float* pin = top_pin.Get(2 * out);
    const auto* pid = reinterpret_cast<const int32_t*>(pin + out);
    top->assign(static_cast<size_t>(rows), {});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < k; ++i) (*top)[r].push_back({pin[r * want + i], pid[r * want + i]});
  }

  // Ranks on the GPU: only the shortlist comes back. When Attend queued it already with the
  // query (early), and no representative of a candidate changed since, that one is read.
  bool ScoreTop(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a, bool sum_heads,
                int64_t want, std::vector<std::vector<Scored>>* top) override {
    if (a.n <= 0) {
      top->assign(sum_heads ? 1 : static_cast<size_t>(a.kv_heads), {});
      return true;
    }
    if (!IsRange(a)) return false;
    const int64_t first = a.blocks[0];
    // (No representative changed since: the layer's version is the one the early copy took.)
    const bool early = early_layer == layer && early_first == first && early_n == a.n &&
                       early_want == want && early_sum == sum_heads &&
                       early_version == reps.version(layer);
    early_layer = -1;
    if (!early) {
      QueueShortlist(layer, reps, first, a.n, sum_heads, want);
      Sync(nullptr);
    }
    ReadShortlist(a.n, sum_heads, want, top);
    return true;
  }

  // Decode: queues the shortlist the planner will ask this layer for (WillShortlist), with the
  // query's copy, so that one wait serves both.
  void QueueEarlyShortlist(int64_t layer, const AttnArgs& a) {
    early_layer = -1;
    int64_t first = 0, end = 0, want = 0;
    bool sum = false;
    if (!planner.WillShortlist(layer, a, &first, &end, &want, &sum)) return;
    QueueShortlist(layer, planner.representatives(), first, end - first, sum, want);
    early_layer = layer, early_first = first, early_n = end - first, early_want = want;
    early_version = planner.representatives().version(layer);
    early_sum = sum;
  }

  const ModelConfig& m;
  SparseConfig c;
  ThreadingContext& tc;
  cudaStream_t stream;
  std::unique_ptr<Backend> cpu;
  KVCache host, staging;
  SparseAttention planner;
  bool residual_on_gpu;
  int sm = 1;
  StepInfo step;
  // The call in flight (Attend): the model's queries and output on the GPU and its cache.
  const float* q_dev = nullptr;
  float* out_dev = nullptr;
  KVCache* model_cache = nullptr;
  PinnedFloats q_pin, row_pin, part_pin, lse_pin, top_pin;
  std::vector<int32_t> table_host;
  int64_t table_lb = -1, table_pb = -1;
  cuda::GrowBuffer table_dev{"hybrid window table"}, lse_g{"hybrid lse"},
      gpu_part{"hybrid partials"};
  cuda::AttnWorkspace ws;
  std::vector<float> block_stats;               // AttendBlocks' per-block sums
  uint8_t* reps_dev = nullptr;                  // [layer][block][kv_head][R][D], the store's layout
  std::vector<std::vector<uint32_t>> uploaded;  // [layer][block]: stamp of the GPU's copy
  // [layer]: the candidates [up_first, up_end) were all current on the GPU at up_version.
  std::vector<uint64_t> up_version;
  std::vector<int64_t> up_first, up_end;
  cuda::GrowBuffer score_buf{"hybrid block scores"};
  cudaEvent_t layer_start = nullptr;  // decode: the GPU finished the previous layer (Target)
  // The shortlist queued early (QueueEarlyShortlist) and what it was for; layer -1: none.
  int64_t early_layer = -1, early_first = 0, early_n = 0, early_want = 0;
  uint64_t early_version = 0;
  bool early_sum = false;
  HybridStats stats;
};

HybridAttention::HybridAttention(const ModelConfig& m, const SparseConfig& c, Backend& gpu,
                                 ThreadingContext& tc, int64_t max_tokens, DType kv_type,
                                 size_t host_limit, bool residual_on_gpu)
    : impl_(std::make_unique<Impl>(m, c, gpu, tc, max_tokens, kv_type, host_limit,
                                   residual_on_gpu)) {}
HybridAttention::~HybridAttention() = default;

SparseAttention& HybridAttention::planner() { return impl_->planner; }
const HybridStats& HybridAttention::stats() const { return impl_->stats; }
KVCache& HybridAttention::host_cache() { return impl_->host; }

void HybridAttention::AdoptContext(KVCache& model_cache, int64_t P) {
  Impl& x = *impl_;
  const int64_t B = x.c.block_size;
  x.host.SetSize(P);
  for (int64_t l = 0; l < x.m.num_layers; ++l) {
    if (x.Dense(l)) continue;
    x.planner.IndexContext(l, x.host);
    const int64_t init_b = std::min(x.c.init_end() / B, (P + B - 1) / B);
    const int64_t local_b = std::max(x.c.LocalBegin(P) / B, init_b), last_b = (P + B - 1) / B;
    for (int64_t b = 0; b < init_b; ++b) model_cache.AssignBlocks(l, b * B, 1);
    for (int64_t b = local_b; b < last_b; ++b) model_cache.AssignBlocks(l, b * B, 1);
    x.CopyBlocks(x.host, l, model_cache, l, 0, init_b, cudaMemcpyHostToDevice);
    x.CopyBlocks(x.host, l, model_cache, l, local_b, last_b, cudaMemcpyHostToDevice);
  }
  model_cache.SetSize(P);
  x.table_lb = x.table_pb = -1;
  x.Sync(nullptr);
}

void HybridAttention::Reset() {
  impl_->planner.Reset();
  impl_->host.Clear();
  impl_->table_lb = impl_->table_pb = -1;
}

void HybridAttention::BeginStep(const StepInfo& s) {
  impl_->step = s;
  impl_->planner.BeginStep(s);
  if (s.call_T == 1) ++impl_->stats.steps;
}

KVTarget HybridAttention::Target(int64_t layer, KVCache& cache) {
  Impl& x = *impl_;
  // Decode: called before the layer's projections are queued; the event marks the end of the
  // previous layer's work on the GPU (Attend waits for it before waking the CPU's threads).
  if (x.step.call_T == 1) NEEDLE_CUDA_CHECK(cudaEventRecord(x.layer_start, x.stream));
  if (x.step.call_T == 1 || HybridDenseLayer(x.m, x.c, layer)) return {&cache, layer};
  if (x.step.pos0 == x.step.call_pos0) {
    x.model_cache = &cache;
    x.StartPromptLayer(layer);
  }
  return {&x.staging, 0};
}

AttentionPolicy::Prefill HybridAttention::PrefillOrder(int64_t) const {
  return {true, impl_->residual_on_gpu};
}

void HybridAttention::EndPrefill() {
  Impl& x = *impl_;
  x.host.SetSize(x.step.call_pos0 + x.step.call_T);
  x.table_lb = x.table_pb = -1;
}

void HybridAttention::Attend(int64_t layer, const float* q, const AttnArgs& a, KVCache& cache,
                             float* out) {
  Impl& x = *impl_;
  x.q_dev = q;
  x.out_dev = out;
  x.model_cache = &cache;
  const bool dense = x.Dense(layer);
  if (a.T > 1 || x.step.call_T > 1) {
    if (dense) {  // dense layers of a prompt: the GPU alone, no planning
      cuda::Attention(q, cache.Layer(layer), a, out, nullptr, x.sm, x.ws, x.stream);
      return;
    }
    x.PromptAttend(layer, a);
    return;
  }
  // Decode: the new row to the host (sparse layers), the query to the host, then the planner.
  // (The copies wait for the layer's projections: counted as waiting for the GPU.)
  if (!dense) x.RowToPinned(layer, a.pos0);
  const int64_t HD = a.heads * a.head_dim;
  float* q_host = x.q_pin.Get(static_cast<size_t>(HD));
  x.D2H(q_host, q, static_cast<size_t>(HD) * 4);
  x.QueueEarlyShortlist(layer, a);
  // The CPU attends Context blocks after the projections and the selection's round trip to the
  // GPU: once the GPU has finished the previous layer (layer_start), wake its threads, so that
  // they are up when the plan is (ThreadingContext::Wake: waking them only when the plan was
  // ready left 60-90 us a layer in the step; waking them before this wait would have them spin
  // through the previous layer's MLP).
  if (x.planner.AttendsPlan(layer, a)) {
    const auto t = Clock::now();
    NEEDLE_CUDA_CHECK(cudaEventSynchronize(x.layer_start));
    x.stats.gpu_wait += Since(t);
    x.tc.Wake(400);
  }
  x.Sync(&x.stats.gpu_wait);
  if (!dense) x.RowToCache(layer, a.pos0);
  const auto t = Clock::now();
  const double before = x.ExecutorTime();
  x.planner.Attend(layer, q_host, a, x.host, out);
  x.stats.plan += Since(t) - (x.ExecutorTime() - before);
}

}  // namespace needle
