#include "engine/cuda/hybrid.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "engine/base/error.h"
#include "engine/cuda/attention.h"
#include "engine/cuda/chunk_prefill.h"
#include "engine/cuda/context_gather.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_buffer.h"
#include "engine/cuda/hybrid_select.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/kv_rows.h"
#include "engine/cuda/pinned_host.h"
#include "engine/cuda/resident_blocks.h"

namespace needle {

namespace {
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}
// The log-sum-exp of two partials, as cuda::MergeAttention computes it.
float MergeLse(float a, float b) {
  const float M = std::max(a, b);
  const float wa = a == -INFINITY ? 0.f : std::exp(a - M),
              wb = b == -INFINITY ? 0.f : std::exp(b - M);
  const float sum = wa + wb;
  return sum > 0.f ? M + std::log(sum) : -INFINITY;
}
}  // namespace

struct HybridAttention::Impl final : PlanExecutor {
  Impl(const ModelConfig& m_, const SparseConfig& c_, Backend& gpu_, ThreadingContext& tc_,
       int64_t max_tokens, DType kv, size_t host_limit, bool residual_on_gpu_, bool device_kv_)
      : m(m_),
        c(c_),
        tc(tc_),
        stream(CudaBackendStream(gpu_)),
        cpu(MakeCpuBackend(tc_, false)),
        host(HybridHostShape(m_, c_, max_tokens, kv), host_limit),
        staging(HybridStagingShape(m_, c_, max_tokens, kv), 0, gpu_.kv_memory()),
        planner(m_, c_, *cpu, tc_, max_tokens, kv),
        residual_on_gpu(residual_on_gpu_),
        device_kv(device_kv_),
        scorer(m_, planner.representatives(), stream),
        prefill(staging, (max_tokens + c_.block_size - 1) / c_.block_size, scorer,
                CudaBackendStream(gpu_)),
        resident(m_.num_layers, m_.num_kv_heads, device_kv_ ? c_.topk : c_.GpuContextSlots()) {
    if (device_kv) c.gpu_share = 100;  // (the executor's copy: every selected block on the GPU)
    if (kv == DType::kI8)
      Fail("--kv-type int8: the hybrid engine's GPU kernels read f32, f16 or bf16 caches");
    planner.set_executor(this);
    int dev = 0;
    NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
    NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
    NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&layer_start, cudaEventDisableTiming));
    NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&gpu_done, cudaEventDisableTiming));
    // The host cache is page-locked as it fills (copies by DMA); the GPU reads its share of the
    // Context blocks from it where kernels can use host pointers.
    const size_t bb = host.BlockBytes();
    pin_k.Reset(host.BlockData(0, false, 0), bb * static_cast<size_t>(host.shape().TotalSlots()));
    pin_v.Reset(host.BlockData(0, true, 0), bb * static_cast<size_t>(host.shape().TotalSlots()));
    gather_on = c.gpu_share > 0 && (bb / static_cast<size_t>(m.num_kv_heads)) % 16 == 0 &&
                (device_kv || cuda::HostPointersUsableOnGpu());
    if (device_kv && !gather_on)
      Fail("--kv-placement device: a block of one KV head (", bb / m.num_kv_heads,
           " bytes) is not a multiple of 16 bytes");
  }

  ~Impl() override {
    JoinPinAhead();
    if (layer_start != nullptr) cudaEventDestroy(layer_start);
    if (gpu_done != nullptr) cudaEventDestroy(gpu_done);
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
  // n floats from the device into host memory, through pinned memory, waiting for them.
  void LseToHost(const float* dev, int64_t n, float* host_dst) {
    float* pin = lse_pin.Get(static_cast<size_t>(n));
    D2H(pin, dev, static_cast<size_t>(n) * 4);
    Sync(nullptr);
    std::copy_n(pin, n, host_dst);
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
      for (bool v : {false, true}) {
        // (The host cache's side is cut where its page-locked chunks end: ArenaPinning.)
        const cuda::ArenaPinning& pin = v ? pin_v : pin_k;
        uint8_t* d = dst.BlockData(dl, v, d0);
        const uint8_t* s = src.BlockData(sl, v, s0);
        for (size_t left = bb * static_cast<size_t>(n); left > 0;) {
          size_t len = left;
          if (kind == cudaMemcpyDeviceToHost) len = std::min(len, pin.ToChunkEnd(d));
          if (kind == cudaMemcpyHostToDevice) len = std::min(len, pin.ToChunkEnd(s));
          NEEDLE_CUDA_CHECK(cudaMemcpyAsync(d, s, len, kind, stream));
          d += len, s += len, left -= len;
        }
      }
      b += n;
    }
  }

  // Page-locks the host cache's blocks [b0, b1) of `layer` (K and V; slots are assigned in
  // order, so the range between the lowest and highest slot). False when CUDA refused.
  bool PinHost(int64_t layer, int64_t b0, int64_t b1) {
    int32_t lo = INT32_MAX, hi = -1;
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t sl = host.SlotOf(layer, b);
      if (sl >= 0) lo = std::min(lo, sl), hi = std::max(hi, sl);
    }
    if (hi < 0) return true;
    const size_t n = host.BlockBytes() * static_cast<size_t>(hi - lo + 1);
    const bool k = pin_k.Pin(host.BlockData(layer, false, lo), n);
    return pin_v.Pin(host.BlockData(layer, true, lo), n) && k;
  }

  // --- prompts: layer by layer; a sparse layer's keys in the staging layer ----------------------
  // Page-locks the host cache's range of the prompt in the next sparse layer after `layer` on
  // another thread, while this layer computes (registering fresh memory costs about a third of a
  // second per GB: bench/RESULTS.md).
  void PinAhead(int64_t layer) {
    JoinPinAhead();
    int64_t next = layer + 1;
    while (next < m.num_layers && Dense(next)) ++next;
    if (next >= m.num_layers) return;
    const int64_t p0 = step.call_pos0, end = p0 + step.call_T, B = c.block_size;
    host.AssignBlocks(next, p0, step.call_T);  // (slots in order, as the micro-batches would)
    int dev = 0;
    NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
    pin_ahead = std::thread([this, next, p0, end, B, dev] {
      if (cudaSetDevice(dev) == cudaSuccess) PinHost(next, p0 / B, (end + B - 1) / B);
    });
  }
  void JoinPinAhead() {
    if (pin_ahead.joinable()) pin_ahead.join();
  }

  void StartPromptLayer(int64_t layer) {
    PinAhead(layer);
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
    auto t = Clock::now();
    host.AssignBlocks(layer, a.pos0, a.T);
    PinHost(layer, a.pos0 / B, (end + B - 1) / B);
    stats.prompt_pin += Since(t);
    CopyBlocks(staging, 0, host, layer, a.pos0 / B, (end + B - 1) / B, cudaMemcpyDeviceToHost);
    // The planner reads the queries of the prompt's observation window and its last query; a
    // sparse prefill's selection, their sums (made here), or every query to re-rank blocks by
    // their best key.
    const int64_t HD = a.heads * a.head_dim;
    float* q_host = q_pin.Get(static_cast<size_t>(a.T * HD));
    prompt_pos0 = a.pos0;
    const bool all_q = c.sparse_prefill && c.rescore_blocks > 0;
    if (c.sparse_prefill && !all_q) {
      // (The chunks' shortlists too, where their candidates' representatives are ready.)
      t = Clock::now();
      KVLayerView hv = host.Layer(layer);
      hv.n_tokens = end;
      prefill.QueueScoringQueries(layer, planner, planner.PrefillChunkScoring(layer, a, hv), q_dev,
                                  a, c.repr == ReprType::kQuest);
      stats.prompt_plan += Since(t);
    }
    if (all_q || call_end - end < c.obs_window || step.last_of_call) {
      const int64_t t0 = all_q ? 0 : std::max<int64_t>(0, a.T - c.obs_window);
      D2H(q_host + t0 * HD, q_dev + t0 * HD, static_cast<size_t>((a.T - t0) * HD) * 4);
    }
    Sync(&stats.prompt_wait);
    prefill.BeginMicroBatch();
    t = Clock::now();
    planner.Attend(layer, q_host, a, host, out_dev);
    stats.prompt_plan += Since(t);
    if (step.last_of_call) {
      // The first decode step's Initial and Local blocks go to the layer's ring (device
      // placement: every block).
      const int64_t init_b = std::min(c.init_end() / B, (end + B - 1) / B);
      const int64_t local_b = device_kv ? 0 : c.LocalBegin(end) / B, last_b = (end + B - 1) / B;
      for (int64_t b = 0; b < init_b; ++b) model_cache->AssignBlocks(layer, b * B, 1);
      for (int64_t b = std::max(local_b, init_b); b < last_b; ++b)
        model_cache->AssignBlocks(layer, b * B, 1);
      CopyBlocks(staging, 0, *model_cache, layer, 0, init_b, cudaMemcpyDeviceToDevice);
      CopyBlocks(staging, 0, *model_cache, layer, std::max(local_b, init_b), last_b,
                 cudaMemcpyDeviceToDevice);
    }
  }

  // Sparse prefill (chunk_prefill.h): the chunks' scoring queries, then each chunk's attention.
  bool ChunkQueries(int64_t, const AttnArgs& a, float* qa, float* qb) override {
    // (Without them the planner would read queries this engine did not copy to the host.)
    const bool queued = prefill.ChunkQueries(a, qa, qb);
    NEEDLE_CHECK(queued);
    return true;
  }
  bool ChunkTop(int64_t, const AttnArgs& a, std::vector<std::vector<Scored>>* top) override {
    return prefill.ChunkTop(a, top);
  }
  bool PrefillChunk(int64_t, const float*, const AttnArgs& a, const KVLayerView&, const Chunk& ch,
                    float* out, float* lse) override {
    float* lse_dev =
        lse != nullptr ? lse_g.Get<float>(static_cast<size_t>(a.T * a.heads)) : nullptr;
    prefill.Attend(q_dev, prompt_pos0, a, ch, out, lse_dev, sm, ws);
    if (lse != nullptr) LseToHost(lse_dev, a.T * a.heads, lse);
    return true;
  }

  // --- decode ----------------------------------------------------------------------------------
  // The view of a sparse layer's ring as one causal sequence: Initial blocks, the n_g Context
  // blocks gathered into its extra slots (GatherContext), then the Local blocks, renumbered (the
  // keys were rotated at their true positions when written, and a query's softmax does not
  // depend on their order). *a2: the query's arguments over it. init false: Local alone (with
  // position remapping the CPU attends the Initial keys, which move).
  KVLayerView WindowView(int64_t layer, const AttnArgs& a, int64_t n_g, AttnArgs* a2,
                         bool init = true) {
    const int64_t B = c.block_size, p = a.pos0, ie = init ? c.init_end() : 0, lb = c.LocalBegin(p);
    const int64_t shift = lb - ie - n_g * B;             // positions the view moves Local by
    const int64_t n = (p - shift) / B + 1, ib = ie / B;  // blocks of the view, Initial blocks
    const int64_t key = init ? n_g : -1;                 // (Local alone: no gathered blocks)
    if (lb != table_lb || p / B != table_pb || key != table_ng) {
      table_host.resize(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) {
        table_host[j] = j < ib ? model_cache->SlotOf(layer, j)
                        : j < ib + n_g
                            ? static_cast<int32_t>(model_cache->shape().ExtraSlot(layer, j - ib))
                            : model_cache->SlotOf(layer, lb / B + (j - ib - n_g));
        NEEDLE_CHECK(table_host[j] >= 0);
      }
      int32_t* d = table_dev.Get<int32_t>(table_host.size());
      H2D(d, table_host.data(), table_host.size() * sizeof(int32_t));
      table_lb = lb, table_pb = p / B, table_ng = key;
    }
    KVLayerView v = model_cache->Layer(layer);
    v.table = table_dev.Get<int32_t>(table_host.size());
    *a2 = a;
    a2->pos0 = p - shift;
    return v;
  }

  // How many of each KV head's selected blocks the GPU attends (SparseConfig::gpu_share of the
  // shortest list, at most the extra slots); 0: the CPU attends them all.
  int64_t GpuShare(const LayerPlan& plan) const {
    if (!gather_on || plan.blocks.empty()) return 0;
    size_t shortest = plan.blocks[0].size();
    for (const auto& b : plan.blocks) shortest = std::min(shortest, b.size());
    return std::min(resident.slots(), (c.gpu_share * static_cast<int64_t>(shortest) + 50) / 100);
  }
  // Places the GPU's n_g blocks of every KV head in the layer's extra slots (ResidentBlocks: the
  // ones already there stay) and queues the copy of the others, from the host cache or from a
  // later slot. Returns n_g, or 0 where CUDA refused to page-lock a block to read (the CPU attends
  // everything from then on).
  int64_t GatherContext(int64_t layer, const LayerPlan& plan, int64_t n_g) {
    const int64_t Hk = m.num_kv_heads;
    resident.Place(layer, plan.blocks, plan.retained, n_g, &copies);
    // (Device placement: the blocks come from the layer's own ring, in GPU memory.)
    KVCache& from = device_kv ? *model_cache : host;
    for (const auto& cp : copies)
      if (!device_kv && cp.from < 0 && !PinHost(layer, cp.block, cp.block + 1)) {
        gather_on = false;
        resident.Clear();
        return 0;
      }
    const auto from_host = std::count_if(
        copies.begin(), copies.end(), [](const ResidentBlocks::Copy& cp) { return cp.from < 0; });
    stats.gpu_blocks += n_g * Hk;
    stats.gpu_reused += n_g * Hk - from_host;
    if (copies.empty()) return n_g;
    // (The kernel reads the lists from pinned memory; they are rewritten only after the next
    // layer's wait for the stream.)
    const size_t nc = copies.size();
    auto* src = reinterpret_cast<int32_t*>(src_pin.Get(2 * nc));
    int32_t* dst = src + nc;
    for (size_t i = 0; i < nc; ++i) {
      const ResidentBlocks::Copy& cp = copies[i];
      const int32_t at = cp.from < 0 ? from.SlotOf(layer, cp.block) : cp.from;
      src[i] = at * static_cast<int32_t>(Hk) + cp.head;
      if (cp.from >= 0) src[i] = -1 - src[i];
      dst[i] = cp.to * static_cast<int32_t>(Hk) + cp.head;
    }
    const int64_t x0 = model_cache->shape().ExtraSlot(layer, 0);
    cuda::GatherBlocks(from.BlockData(layer, false, 0), from.BlockData(layer, true, 0), src, dst,
                       static_cast<int64_t>(nc), host.BlockBytes() / static_cast<size_t>(Hk),
                       model_cache->BlockData(layer, false, x0),
                       model_cache->BlockData(layer, true, x0), stream);
    return n_g;
  }

  // The new token's K/V row of a sparse layer, from its ring to the host cache through pinned
  // memory (kv_rows.h): queued with the query, copied into the cache once the host has waited.
  void RowToPinned(int64_t layer, int64_t p) {
    host.AssignBlocks(layer, p, 1);
    if (p % c.block_size == 0) PinHost(layer, p / c.block_size, p / c.block_size + 1);
    QueueRowToPinned(*model_cache, layer, p, RowPin(), stream);
  }
  void RowToCache(int64_t layer, int64_t p) { RowFromPinned(RowPin(), host, layer, p); }
  uint8_t* RowPin() {
    return reinterpret_cast<uint8_t*>(row_pin.Get((KVRowBytes(host.shape()) + 3) / 4));
  }

  // --- PlanExecutor ----------------------------------------------------------------------------
  void Dense(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv, float* out,
             float* lse) override {
    AttnArgs a2 = a;
    KVLayerView v;
    const int64_t B = c.block_size, ib = c.init_end() / B, cb = c.LocalBegin(a.pos0) / B;
    if (step.call_T == 1 && !Dense(layer) && cb > ib) {
      // A layer whose keys live in host memory that the planner attends densely at this step
      // (the first dense_layers within the trained length, with --prefill sparse): a plan of
      // every Context block.
      LayerPlan all;
      all.blocks.assign(static_cast<size_t>(a.kv_heads), {});
      for (auto& hb : all.blocks)
        for (int64_t b = ib; b < cb; ++b) hb.push_back(static_cast<int32_t>(b));
      dense_lse.resize(static_cast<size_t>(a.heads));
      Planned(layer, q, a, kv, all, out, lse != nullptr ? lse : dense_lse.data(), nullptr);
      return;
    }
    if (step.call_T > 1)
      v = Dense(layer) ? model_cache->Layer(layer) : staging.Layer(0);
    else
      v = Dense(layer) ? model_cache->Layer(layer) : WindowView(layer, a, 0, &a2);
    float* lse_dev =
        lse != nullptr ? lse_g.Get<float>(static_cast<size_t>(a.T * a.heads)) : nullptr;
    cuda::Attention(q_dev, v, a2, out_dev, lse_dev, sm, ws, stream);
    if (lse != nullptr) {
      const auto t = Clock::now();
      LseToHost(lse_dev, a.T * a.heads, lse);
      if (step.call_T == 1) stats.gpu_wait += Since(t);
    }
  }

  bool Planned(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
               const LayerPlan& plan, float*, float* lse,
               std::vector<std::vector<float>>* mass) override {
    const int64_t HD = a.heads * a.head_dim, Hk = a.kv_heads, G = a.heads / Hk;
    // GPU, queued first so that it runs while the CPU attends: n_g selected blocks of every KV
    // head (those it holds from earlier steps, the others from the host cache), attended with
    // Initial + Local; their softmax sums. With position remapping, Local alone: the Initial and
    // Context keys move by amounts that change with the step, and the CPU rotates its query.
    const bool remap = plan.remap && a.inv_freq != nullptr;
    int64_t n_g = remap ? 0 : GpuShare(plan);
    if (n_g > 0) n_g = GatherContext(layer, plan, n_g);
    AttnArgs a2;
    const KVLayerView v = WindowView(layer, a, n_g, &a2, !remap);
    // Device: [g_out HD][g_lse heads][block sums n_stats][c_out HD][c_lse heads]; the lse and
    // the sums come back in one copy.
    const size_t n_stats = mass != nullptr ? static_cast<size_t>(Hk * n_g * G * 2) : 0;
    float* g = gpu_part.Get<float>(static_cast<size_t>(2 * (HD + a.heads)) + n_stats);
    float *g_out = g, *g_lse = g + HD, *c_out = g_lse + a.heads + n_stats, *c_lse = c_out + HD;
    // Every selected block on the GPU (device placement): its output is the layer's.
    bool gpu_all = !remap && n_g > 0;
    for (const auto& hb : plan.blocks) gpu_all = gpu_all && static_cast<int64_t>(hb.size()) == n_g;
    cuda::Attention(q_dev, v, a2, gpu_all ? out_dev : g_out, g_lse, sm, ws, stream);
    if (n_stats > 0) {
      const size_t x0 = static_cast<size_t>(model_cache->shape().ExtraSlot(layer, 0));
      cuda::BlockStats(q_dev, v.k + x0 * model_cache->BlockBytes(), v.dtype, n_g, Hk, G,
                       c.block_size, a.head_dim, a.scale, g_lse + a.heads, stream);
    }
    float* g_pin = gl_pin.Get(static_cast<size_t>(a.heads) + n_stats);
    D2H(g_pin, g_lse, (static_cast<size_t>(a.heads) + n_stats) * 4);
    NEEDLE_CUDA_CHECK(cudaEventRecord(gpu_done, stream));
    if (gpu_all) {
      auto t = Clock::now();
      NEEDLE_CUDA_CHECK(cudaEventSynchronize(gpu_done));
      stats.gpu_wait += Since(t);
      stats.gpu_wait_part += Since(t);
      std::copy_n(g_pin, a.heads, lse);
      if (mass == nullptr) return false;
      all_stats.clear();
      for (int64_t h = 0; h < Hk; ++h)
        for (int32_t b : plan.blocks[h]) {
          const float* from = g_pin + a.heads + (h * n_g + GpuSlotOf(layer, h, n_g, b)) * G * 2;
          all_stats.insert(all_stats.end(), from, from + G * 2);
        }
      fast::BlockMassFromStats(all_stats, lse, G, plan.blocks, mass);
      return true;
    }
    // CPU: the rest, in plan order.
    const std::vector<std::vector<int32_t>>* cb = &plan.blocks;
    if (n_g > 0) {
      cpu_blocks.resize(plan.blocks.size());
      for (size_t h = 0; h < plan.blocks.size(); ++h) {
        cpu_blocks[h].clear();
        for (int32_t b : plan.blocks[h])
          if (GpuSlotOf(layer, static_cast<int64_t>(h), n_g, b) < 0) cpu_blocks[h].push_back(b);
      }
      cb = &cpu_blocks;
    }
    auto t = Clock::now();
    float* cpu_part = part_pin.Get(static_cast<size_t>(HD + a.heads));
    if (remap) {
      plan.ToSpans(Hk, &spans, a.inv_freq, a.head_dim, false);
      cpu->Attention(q, kv, a, &spans, cpu_part, cpu_part + HD);
    } else {
      fast::AttendBlocks(q, kv, a, *cb, cpu_part, cpu_part + HD, &block_stats, tc);
    }
    stats.cpu_attend += Since(t);
    for (const auto& b : *cb) stats.cpu_blocks += static_cast<int64_t>(b.size());
    // GPU: the CPU's partial merged into the layer's output. No wait for it: the host computes
    // the merged log-sum-exp itself, from the GPU's, which came with its block sums.
    t = Clock::now();
    H2D(c_out, cpu_part, static_cast<size_t>(HD + a.heads) * 4);
    cuda::MergeAttention(g_out, g_lse, c_out, c_lse, a.heads, a.head_dim, out_dev, nullptr, stream);
    stats.copies += Since(t);
    t = Clock::now();
    NEEDLE_CUDA_CHECK(cudaEventSynchronize(gpu_done));
    stats.gpu_wait += Since(t);
    stats.gpu_wait_part += Since(t);
    for (int64_t r = 0; r < a.heads; ++r) lse[r] = MergeLse(g_pin[r], cpu_part[HD + r]);
    if (mass == nullptr || remap) return false;
    const std::vector<float>* st = &block_stats;
    if (n_g > 0) {  // every head's blocks in plan order, each from the GPU's slot or the CPU
      all_stats.clear();
      const float* ci = block_stats.data();
      for (int64_t h = 0; h < Hk; ++h)
        for (int32_t b : plan.blocks[h]) {
          const int64_t j = GpuSlotOf(layer, h, n_g, b);
          const float* from = j >= 0 ? g_pin + a.heads + (h * n_g + j) * G * 2 : ci;
          if (j < 0) ci += G * 2;
          all_stats.insert(all_stats.end(), from, from + G * 2);
        }
      st = &all_stats;
    }
    fast::BlockMassFromStats(*st, lse, G, plan.blocks, mass);
    return true;
  }

  // The GPU slot of head h that holds block b among the n_g it attends, or -1.
  int64_t GpuSlotOf(int64_t layer, int64_t h, int64_t n_g, int32_t b) const {
    for (int64_t j = 0; j < n_g; ++j)
      if (resident.At(layer, h, j) == b) return j;
    return -1;
  }

  // (With position remapping the planner scores a rotated query, ScoringQueries, which the GPU
  // does not have: it scores on the CPU.)
  bool Score(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a,
             float* scores) override {
    return !c.pos_remap && scorer.Score(layer, reps, a, q_dev, scores);
  }
  bool ScoreTop(int64_t layer, const RepresentativeStore& reps, const ScoreArgs& a, bool sum_heads,
                int64_t want, std::vector<std::vector<Scored>>* top) override {
    return !c.pos_remap && scorer.ScoreTop(layer, reps, a, sum_heads, want, q_dev, top);
  }

  const ModelConfig& m;
  SparseConfig c;
  ThreadingContext& tc;
  cudaStream_t stream;
  std::unique_ptr<Backend> cpu;
  KVCache host, staging;
  SparseAttention planner;
  bool residual_on_gpu;
  bool device_kv;  // --kv-placement device: the rings hold every block, the GPU attends them all
  cuda::GpuBlockScorer scorer;  // the planner's scoring and top-k, on the GPU
  ChunkPrefill prefill;         // --prefill sparse on the GPU
  int sm = 1;
  StepInfo step;
  // The call in flight (Attend): the model's queries and output on the GPU and its cache.
  const float* q_dev = nullptr;
  float* out_dev = nullptr;
  KVCache* model_cache = nullptr;
  cuda::PinnedFloats q_pin, row_pin, part_pin, lse_pin, gl_pin;
  cuda::ArenaPinning pin_k, pin_v;  // the host cache's arenas (declared after it: freed first)
  std::thread pin_ahead;            // PinAhead's
  bool gather_on = false;           // the GPU attends its share of the Context blocks
  cuda::PinnedFloats src_pin;       // GatherContext's sources and destinations (int32)
  ResidentBlocks resident;          // the Context blocks in the extra slots, per layer and head
  std::vector<ResidentBlocks::Copy> copies;
  std::vector<std::vector<int32_t>> cpu_blocks;  // [kv_head] the blocks the CPU attends
  std::vector<float> all_stats;                  // the GPU's and CPU's block sums, plan order
  std::vector<int32_t> table_host;
  int64_t prompt_pos0 = 0;  // the prompt micro-batch in flight: its first position (q_dev's row 0)
  int64_t table_lb = -1, table_pb = -1, table_ng = -1;
  cuda::GrowBuffer table_dev{"hybrid window table"}, lse_g{"hybrid lse"},
      gpu_part{"hybrid partials"};
  cuda::AttnWorkspace ws;
  std::vector<float> block_stats;  // AttendBlocks' per-block sums
  AttnSpans spans;                 // remapped decode: the CPU's keys
  std::vector<float> dense_lse;
  cudaEvent_t layer_start = nullptr;  // decode: the GPU finished the previous layer (Target)
  cudaEvent_t gpu_done = nullptr;     // decode: the GPU's partial's lse and block sums are here
  HybridStats stats;
};

HybridAttention::HybridAttention(const ModelConfig& m, const SparseConfig& c, Backend& gpu,
                                 ThreadingContext& tc, int64_t max_tokens, DType kv_type,
                                 size_t host_limit, bool residual_on_gpu, bool device_kv)
    : impl_(std::make_unique<Impl>(m, c, gpu, tc, max_tokens, kv_type, host_limit, residual_on_gpu,
                                   device_kv)) {}
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
    x.PinHost(l, 0, (P + B - 1) / B);
    const int64_t init_b = std::min(x.c.init_end() / B, (P + B - 1) / B);
    const int64_t local_b = std::max(x.device_kv ? 0 : x.c.LocalBegin(P) / B, init_b),
                  last_b = (P + B - 1) / B;
    for (int64_t b = 0; b < init_b; ++b) model_cache.AssignBlocks(l, b * B, 1);
    for (int64_t b = local_b; b < last_b; ++b) model_cache.AssignBlocks(l, b * B, 1);
    x.CopyBlocks(x.host, l, model_cache, l, 0, init_b, cudaMemcpyHostToDevice);
    x.CopyBlocks(x.host, l, model_cache, l, local_b, last_b, cudaMemcpyHostToDevice);
  }
  model_cache.SetSize(P);
  x.table_lb = x.table_pb = -1;
  x.resident.Clear();
  x.Sync(nullptr);
}

void HybridAttention::Reset() {
  impl_->JoinPinAhead();
  impl_->planner.Reset();
  impl_->host.Clear();
  impl_->table_lb = impl_->table_pb = -1;
  impl_->resident.Clear();
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
  x.JoinPinAhead();
  x.host.SetSize(x.step.call_pos0 + x.step.call_T);
  x.table_lb = x.table_pb = -1;
  x.resident.Clear();
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
  if (!x.c.pos_remap) x.scorer.QueueEarly(layer, x.planner, a, q);
  // The CPU attends Context blocks after the projections and the selection's round trip to the
  // GPU: once the GPU has finished the previous layer (layer_start), wake its threads, so that
  // they are up when the plan is (ThreadingContext::Wake: waking them only when the plan was
  // ready left 60-90 us a layer in the step; waking them before this wait would have them spin
  // through the previous layer's MLP).
  if (x.planner.AttendsPlan(layer, a) && !x.device_kv) {
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
