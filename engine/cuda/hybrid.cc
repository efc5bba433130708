#include "engine/cuda/hybrid.h"

#include "engine/base/switches.h"
#include "engine/cuda/host_join.h"
#include "engine/cuda/hybrid_impl.h"

namespace needle {

HybridAttention::Impl::Impl(const ModelConfig& m_, const SparseConfig& c_, Backend& gpu_,
                            ThreadingContext& tc_, int64_t max_tokens, DType kv, size_t host_limit,
                            bool residual_on_gpu_, bool device_kv_)
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
  if (const char* e = std::getenv("NEEDLE_DEVICE_PLAN")) device_plan_on = std::strcmp(e, "0") != 0;
  if (const char* e = std::getenv("NEEDLE_HYBRID_PROFILE")) profile = std::strcmp(e, "1") == 0;
  if (kv == DType::kI8)
    Fail("--kv-type int8: the hybrid engine's GPU kernels read f32, f16 or bf16 caches");
  planner.set_executor(this);
  int dev = 0;
  NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  layer_start.resize(static_cast<size_t>(m.num_layers));
  for (auto& e : layer_start)
    NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&gpu_done, cudaEventDisableTiming));
  {
    const auto L = static_cast<size_t>(m.num_layers);
    late_on = EnvSwitch("NEEDLE_HYBRID_LATE", 0) != 0;
    take_rest = EnvSwitch("NEEDLE_HYBRID_TAKE_REST", 0);
    late_pin = std::vector<cuda::PinnedFloats>(L);
    late_at.resize(L);
    late_tiles.assign(L, 1);
    late_ng.assign(L, 0);
    late_cpu_lse.resize(L);
    late_cpu_stats.resize(L);
    late_done.resize(L);
    for (auto& e : late_done)
      NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
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
  fill_on = gather_on && !device_kv && EnvOnUnlessZero("NEEDLE_HYBRID_FILL");
  if (fill_on) {
    NEEDLE_CUDA_CHECK(cudaStreamCreateWithFlags(&fill_stream, cudaStreamNonBlocking));
    const auto L = static_cast<size_t>(m.num_layers);
    fill_done.resize(L);
    for (auto& e : fill_done)
      NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    fill_pin = std::vector<cuda::PinnedFloats>(L);
  }
  // Host placement planned on the GPU (hybrid_host_plan.cc) where PlansDecode allows it, unless
  // NEEDLE_HYBRID_DEVICE_PLAN=0; else the host's own plans (hybrid_decode.cc).
  host_plan_on = !device_kv && fill_on && HybridHostPlanSwitch();
  if (host_plan_on) {
    map_blocks = HostPlanMapBlocks(max_tokens, c.block_size);
    host_layers = std::vector<HostLayer>(static_cast<size_t>(m.num_layers));
    for (auto& hl : host_layers)
      NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&hl.sel_ready, cudaEventDisableTiming));
    host_plans.resize(static_cast<size_t>(m.num_layers));
    host_ahead = EnvSwitch("NEEDLE_HYBRID_AHEAD", 0) == 1;
    host_lag = std::max(0, EnvSwitch("NEEDLE_HYBRID_LAG", 0));
    fill_ctas = std::max(1, EnvSwitch("NEEDLE_HYBRID_FILL_CTAS", 8));
    post_sel = EnvOnUnlessZero("NEEDLE_HYBRID_POST");
    void* f = nullptr;
    NEEDLE_CUDA_CHECK(cudaMallocHost(&f, static_cast<size_t>(2 * m.num_layers + 1) * 4));
    host_flags = static_cast<uint32_t*>(f);
    std::fill_n(host_flags, 2 * m.num_layers + 1, 0u);
    sel_flags = host_flags + m.num_layers + 1;
    const int64_t hw = m.num_layers * cuda::HandshakeClock::kWords;
    NEEDLE_CUDA_CHECK(cudaMallocHost(&f, static_cast<size_t>(hw) * 8));
    handshake = static_cast<uint64_t*>(f);
    std::fill_n(handshake, hw, uint64_t{0});
    const auto hd = static_cast<size_t>(m.num_layers + cuda::HandshakeSums::kWords);
    NEEDLE_CUDA_CHECK(cudaMemset(handshake_dev.Get<uint64_t>(hd), 0, hd * 8));
    StartHostWorker();
  }
  // Device placement (and host placement planned on the GPU): retention for the next step on a
  // stream of its own (PendingRetain::side).
  if ((device_kv || host_plan_on) && EnvOnUnlessZero("NEEDLE_RETAIN_STREAM")) {
    int least = 0, greatest = 0;
    NEEDLE_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    NEEDLE_CUDA_CHECK(
        cudaStreamCreateWithPriority(&retain_stream, cudaStreamNonBlocking, greatest));
    for (auto* v : {&retain_ready, &retain_done}) {
      v->resize(static_cast<size_t>(m.num_layers));
      for (auto& e : *v) NEEDLE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
  }
}

HybridAttention::Impl::~Impl() {
  StopHostWorker();
  JoinPinAhead();
  if (fill_stream != nullptr) {
    cudaStreamSynchronize(fill_stream);
    cudaStreamDestroy(fill_stream);
  }
  for (cudaEvent_t e : fill_done) cudaEventDestroy(e);
  if (retain_stream != nullptr) {
    cudaStreamSynchronize(retain_stream);
    cudaStreamDestroy(retain_stream);
  }
  for (auto* v : {&retain_ready, &retain_done})
    for (cudaEvent_t e : *v) cudaEventDestroy(e);
  for (cudaEvent_t e : layer_start) cudaEventDestroy(e);
  if (gpu_done != nullptr) cudaEventDestroy(gpu_done);
  for (auto& hl : host_layers) cudaEventDestroy(hl.sel_ready);
  if (host_flags != nullptr) cudaFreeHost(host_flags);
  if (handshake != nullptr) cudaFreeHost(handshake);
  for (cudaEvent_t e : late_done) cudaEventDestroy(e);
  for (cudaEvent_t e : marks) cudaEventDestroy(e);
}

void HybridAttention::Impl::CopyBlocks(const KVCache& src, int64_t sl, KVCache& dst, int64_t dl,
                                       int64_t b0, int64_t b1, cudaMemcpyKind kind) {
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

bool HybridAttention::Impl::PinHost(int64_t layer, int64_t b0, int64_t b1) {
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

void HybridAttention::Impl::PinStepRows() {
  // Here, with the host worker idle (SyncStats drained it) and no JoinHost queued: page-locking
  // (cudaHostRegister) may wait for the GPU. Inside the step the GPU may be waiting in JoinHost
  // for the worker, which may be waiting for the pinning's lock (TakeFills): that deadlocked
  // the first decode step whose row began a new chunk of the host cache (session 41's run a).
  // RowToPinned then finds the row's block page-locked.
  const int64_t p = step.call_pos0, B = c.block_size;
  if (p % B != 0) return;  // (a block already begun: pinned with its first row)
  for (int64_t l = 0; l < m.num_layers; ++l) {
    if (Dense(l)) continue;
    host.AssignBlocks(l, p, 1);
    PinHost(l, p / B, p / B + 1);
  }
}

void HybridAttention::Impl::PinAhead(int64_t layer) {
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

void HybridAttention::Impl::JoinPinAhead() {
  if (pin_ahead.joinable()) pin_ahead.join();
}

void HybridAttention::Impl::StartPromptLayer(int64_t layer) {
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

void HybridAttention::Impl::PromptAttend(int64_t layer, const AttnArgs& a) {
  const int64_t B = c.block_size, end = a.pos0 + a.T, call_end = step.call_pos0 + step.call_T;
  // This micro-batch's blocks to the host (the planner computes their representatives there).
  auto t = Clock::now();
  host.AssignBlocks(layer, a.pos0, a.T);
  PinHost(layer, a.pos0 / B, (end + B - 1) / B);
  stats.prompt_pin += Since(t);
  CopyBlocks(staging, 0, host, layer, a.pos0 / B, (end + B - 1) / B, cudaMemcpyDeviceToHost);
  // The planner reads the queries of the prompt's observation window and its last query; a
  // sparse prefill's selection, their sums (made here; re-ranking by the best key reads them
  // too).
  const int64_t HD = a.heads * a.head_dim;
  float* q_host = q_pin.Get(static_cast<size_t>(a.T * HD));
  prompt_pos0 = a.pos0;
  if (c.sparse_prefill) {
    // (The chunks' shortlists too, where their candidates' representatives are ready.)
    t = Clock::now();
    KVLayerView hv = host.Layer(layer);
    hv.n_tokens = end;
    prefill.QueueScoringQueries(layer, planner, planner.PrefillChunkScoring(layer, a, hv), q_dev, a,
                                c.repr == ReprType::kQuest);
    stats.prompt_plan += Since(t);
  }
  if (call_end - end < c.obs_window || step.last_of_call) {
    const int64_t t0 = std::max<int64_t>(0, a.T - c.obs_window);
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

bool HybridAttention::Impl::ChunkQueries(int64_t, const AttnArgs& a, float* qa, float* qb) {
  // (Without them the planner would read queries this engine did not copy to the host.)
  const bool queued = prefill.ChunkQueries(a, qa, qb);
  NEEDLE_CHECK(queued);
  return true;
}

bool HybridAttention::Impl::ChunkTop(int64_t, const AttnArgs& a,
                                     std::vector<std::vector<Scored>>* top) {
  return prefill.ChunkTop(a, top);
}

bool HybridAttention::Impl::PrefillChunk(int64_t, const float*, const AttnArgs& a,
                                         const KVLayerView&, const Chunk& ch, float* out,
                                         float* lse) {
  float* lse_dev = lse != nullptr ? lse_g.Get<float>(static_cast<size_t>(a.T * a.heads)) : nullptr;
  prefill.Attend(q_dev, prompt_pos0, a, ch, out, lse_dev, sm, ws);
  if (lse != nullptr) LseToHost(lse_dev, a.T * a.heads, lse);
  return true;
}

HybridAttention::HybridAttention(const ModelConfig& m, const SparseConfig& c, Backend& gpu,
                                 ThreadingContext& tc, int64_t max_tokens, DType kv_type,
                                 size_t host_limit, bool residual_on_gpu, bool device_kv)
    : impl_(std::make_unique<Impl>(m, c, gpu, tc, max_tokens, kv_type, host_limit, residual_on_gpu,
                                   device_kv)) {}
int64_t HybridAttention::gpu_slots() const { return impl_->resident.slots(); }

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
  x.ClearResident();
  x.Sync(nullptr);
}

void HybridAttention::Reset() {
  impl_->DrainHost();
  impl_->JoinPinAhead();
  impl_->Sync(nullptr);  // (rows of a step in flight: dropped with the sequence)
  impl_->pending_rows.clear();
  impl_->planner.Reset();
  impl_->host.Clear();
  impl_->table_lb = impl_->table_pb = -1;
  impl_->ClearResident();
}

void HybridAttention::Rewind(KVCache& model_cache, int64_t tokens) {
  Impl& x = *impl_;
  if (tokens > x.host.size())
    Fail("hybrid engine: going on from token ", tokens, "; the host cache holds ", x.host.size());
  x.DrainHost();
  x.JoinPinAhead();
  x.Sync(nullptr);
  x.pending_rows.clear();  // (a decode step's rows: past any prompt's tokens)
  x.planner.Rewind(x.host, tokens);
  model_cache.Truncate(tokens);
  x.table_lb = x.table_pb = -1;
  x.ClearResident();
}

void HybridAttention::Impl::SyncStats() {
  DrainHost();
  FlushRows();
  CollectPhases();
  const cuda::GpuBlockScorer::UploadCounts& u = scorer.counts;
  stats.rep_checks = u.checks, stats.rep_blocks = u.blocks;
  stats.rep_host = u.host_s;
}

void HybridAttention::SyncStats() {
  Impl& x = *impl_;
  x.SyncStats();
  if (x.handshake == nullptr) return;
  // JoinHost's sums (device memory), once every wait queued is over: the worker has written every
  // flag (DrainHost), so this waits for nothing but the GPU.
  const int L = static_cast<int>(x.m.num_layers);
  uint64_t v[cuda::HandshakeSums::kWords];
  NEEDLE_CUDA_CHECK(cudaMemcpyAsync(v, x.handshake_dev.Get<uint64_t>(0) + L, sizeof v,
                                    cudaMemcpyDeviceToHost, x.stream));
  NEEDLE_CUDA_CHECK(cudaStreamSynchronize(x.stream));
  HybridStats& st = x.stats;
  st.join_idle = v[cuda::HandshakeSums::kIdle] * 1e-9;
  st.join_span = v[cuda::HandshakeSums::kSpan] * 1e-9;
  st.join_host = v[cuda::HandshakeSums::kHost] * 1e-9;
  st.handshake = st.join_span - st.join_host;  // (the crossings)
  const auto sgn = [&](int i) { return static_cast<double>(static_cast<int64_t>(v[i])) * 1e-9; };
  st.to_host = sgn(cuda::HandshakeSums::kToHost), st.to_gpu = sgn(cuda::HandshakeSums::kToGpu);
  st.to_host_least = sgn(cuda::HandshakeSums::kMinToHost);
  st.to_gpu_least = sgn(cuda::HandshakeSums::kMinToGpu);
  st.handshakes = static_cast<int64_t>(v[cuda::HandshakeSums::kCount]);
}

void HybridAttention::BeginStep(const StepInfo& s) {
  // (The last step's rows, where the executor planned it, and its marks; not the handshake's
  // sums, which would wait for the GPU.)
  impl_->SyncStats();
  impl_->step = s;
  impl_->step_begin = Clock::now();
  if (s.call_T == 1 && impl_->host_plan_on) {  // (the flags' number of the step, never 0)
    if (++impl_->step_seq == 0) impl_->step_seq = 1;
    impl_->fill_wait_due = true;
    impl_->PinStepRows();
  }
  impl_->planner.BeginStep(s);
  if (s.call_T == 1) ++impl_->stats.steps;
}

KVTarget HybridAttention::Target(int64_t layer, KVCache& cache) {
  Impl& x = *impl_;
  // Decode: called before the layer's projections are queued; the event marks the end of the
  // previous layer's work on the GPU (Attend waits for it before waking the CPU's threads).
  if (x.step.call_T == 1)
    NEEDLE_CUDA_CHECK(cudaEventRecord(x.layer_start[static_cast<size_t>(layer)], x.stream));
  if (x.step.call_T == 1 && layer == x.m.num_layers - 1) x.stats.enqueue += Since(x.step_begin);
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

void HybridAttention::StepQueued() { impl_->DrainHost(); }

void HybridAttention::EndPrefill() {
  Impl& x = *impl_;
  x.DrainHost();
  x.JoinPinAhead();
  x.host.SetSize(x.step.call_pos0 + x.step.call_T);
  x.table_lb = x.table_pb = -1;
  x.ClearResident();
}

void HybridAttention::Attend(int64_t layer, const float* q, const AttnArgs& a, KVCache& cache,
                             float* out) {
  Impl& x = *impl_;
  x.q_dev = q;
  x.out_dev = out;
  if (x.model_cache != &cache) x.model_cache = &cache;  // (the host worker reads it meanwhile)
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
  // A step the executor plans (device placement), or a dense layer whose lse nobody reads: the
  // host waits for nothing; the row reaches the host cache when the next step begins.
  const bool on_exec = !dense && x.planner.PlansOnExecutor(layer, a);
  if (on_exec) x.Mark(Impl::kModel);
  if (!dense) x.RowToPinned(layer, a.pos0, on_exec);
  if (on_exec) x.Mark(Impl::kRow);
  if (on_exec || (dense && !x.planner.ReadsDecodeLse())) {
    const auto t = Clock::now();
    const double before = x.ExecutorTime();
    x.planner.Attend(layer, nullptr, a, x.host, out);
    x.stats.plan += Since(t) - (x.ExecutorTime() - before);
    return;
  }
  x.DrainHost();  // (a layer the host plans shares the CPU's threads and lists with the worker)
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
    NEEDLE_CUDA_CHECK(cudaEventSynchronize(x.layer_start[static_cast<size_t>(layer)]));
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
