// Host placement planned on the GPU: the host's share of each sparse layer on a thread of its own
// (the host worker), off the model's thread. The model's thread queues, per layer, the selection,
// its writing to pinned memory with the selection flag (cuda::Post), the GPU's attention, then
// cuda::JoinHost (the stream waits until the layer's flag says this step) and the merge of the
// CPU's partial, read from pinned memory; it hands the layer's job to the worker and waits for it
// (asleep) before it queues the model's next launches (NEEDLE_HYBRID_AHEAD=1: not before the step's
// end, AttentionPolicy::StepQueued). The worker, per layer in order: waits for the selection,
// attends the CPU's blocks (fast::AttendBlocks on the threading context), writes the partial and
// the block sums, then the flag; then the fill of the GPU block cache (QueueMapFill), which the
// layer's next selection waits for. The GPU waits for the CPU's fold, not for the host to queue
// the merge after it (hybrid_host_plan.cc).
#include <time.h>

#include <exception>

#include "engine/cuda/context_gather.h"
#include "engine/cuda/host_join.h"
#include "engine/cuda/hybrid_impl.h"

namespace needle {

HybridAttention::Impl::HostLayer& HybridAttention::Impl::HostLayerBuffers(int64_t layer,
                                                                          int64_t R) {
  const int64_t Hk = m.num_kv_heads, H = m.num_heads, HD = H * m.head_dim, K = c.topk;
  HostLayer& hl = host_layers[static_cast<size_t>(layer)];
  // At their largest, here: a buffer that grew would drop one the GPU or the worker still
  // reads, and cudaFreeHost waits for the GPU, which may be waiting for the worker (JoinHost).
  // With them the lists of the layer's fills (QueueMapFill: sources, destinations, the map's
  // entries and places; at most one fill a CPU block, each with an evicted block).
  hl.sel.Get(static_cast<size_t>(HostSel::Words(HD, Hk, K, R)));
  hl.part.Get(static_cast<size_t>(HD + H));
  hl.sums.Get(static_cast<size_t>(Hk * K * (H / Hk) * 2));
  fill_pin[static_cast<size_t>(layer)].Get(static_cast<size_t>(6 * Hk * K));
  return hl;
}

void HybridAttention::Impl::StartHostWorker() {
  int dev = 0;
  NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
  // The kernels the worker launches (the fills), and JoinHost's: loaded now. CUDA loads a kernel
  // at its first launch by default, and a load may wait for the whole GPU: the worker's first
  // fill, while JoinHost held the GPU waiting for this same worker's next flag, would never end.
  cuda::PreloadGatherBlocks();
  cuda::PreloadHostJoin();
  host_worker = std::thread([this, dev] {
    if (cudaSetDevice(dev) != cudaSuccess) {
      std::lock_guard<std::mutex> lk(job_mu);
      worker_error =
          std::make_exception_ptr(Error("hybrid engine: the host worker's cudaSetDevice"));
    }
    HostWorkerLoop();
  });
}

void HybridAttention::Impl::StopHostWorker() {
  if (!host_worker.joinable()) return;
  {
    std::lock_guard<std::mutex> lk(job_mu);
    worker_stop = true;
  }
  job_cv.notify_all();
  host_worker.join();
}

void HybridAttention::Impl::PushHostJob(const HostJob& j) {
  {
    std::lock_guard<std::mutex> lk(job_mu);
    jobs.push_back(j);
  }
  ++jobs_pushed;
  job_cv.notify_one();
}

void HybridAttention::Impl::WaitHostAttended(int64_t lag) {
  const auto t = Clock::now();
  {
    std::unique_lock<std::mutex> lk(job_mu);
    done_cv.wait(lk, [&] { return jobs_attended >= jobs_pushed - lag; });
  }
  stats.host_wait += Since(t);
}

void HybridAttention::Impl::DrainHost() {
  if (!host_worker.joinable()) return;
  std::exception_ptr e;
  {
    std::unique_lock<std::mutex> lk(job_mu);
    if (jobs_done < jobs_pushed) {  // (timed only then: host_wait says a worker ran)
      const auto t = Clock::now();
      done_cv.wait(lk, [&] { return jobs_done >= jobs_pushed; });
      stats.host_wait += Since(t);
    }
    std::swap(e, worker_error);
  }
  HybridStats& w = worker_stats;
  stats.gpu_wait += w.gpu_wait, stats.cpu_attend += w.cpu_attend, stats.copies += w.copies;
  stats.cpu_blocks += w.cpu_blocks, stats.gpu_blocks += w.gpu_blocks;
  stats.gpu_filled += w.gpu_filled;
  stats.fold += w.fold;
  w = HybridStats{};
  const uint32_t gave_up = host_flags[m.num_layers];
  if (gave_up != 0) {
    host_flags[m.num_layers] = 0;
    std::string slowest;
    {
      std::lock_guard<std::mutex> lk(job_mu);
      slowest = WorkerSlowest();
    }
    Fail("hybrid engine: the GPU waited ", cuda::kHostJoinTimeoutNs / 1000000000,
         " s for the host's part of decode step ", gave_up, " and gave up (", slowest, ")");
  }
  if (e) std::rethrow_exception(e);
}

int64_t HybridAttention::Impl::HostClockNs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

void HybridAttention::Impl::WorkerAt(int64_t layer, WorkerPhase p) {
  const auto now = Clock::now();
  const double s = std::chrono::duration<double>(now - worker_since).count();
  if (worker_phase != kWorkerIdle && s > 1.0) {
    std::lock_guard<std::mutex> lk(job_mu);
    if (s > slowest_s) slowest_s = s, slowest_layer = worker_layer, slowest_phase = worker_phase;
  }
  worker_layer = layer, worker_phase = p, worker_since = now;
}

std::string HybridAttention::Impl::WorkerSlowest() {
  static const char* const kWhat[] = {"idle", "waiting for the GPU's previous layer",
                                      "waiting for the selection", "attending the CPU's blocks",
                                      "queueing the fill"};
  if (slowest_s == 0) return "no phase of the host worker took over a second";
  std::string r = "the host worker spent " + std::to_string(slowest_s) + " s " +
                  kWhat[slowest_phase] + " at layer " + std::to_string(slowest_layer);
  slowest_s = 0;
  return r;
}

void HybridAttention::Impl::KeepWorkerError() {
  std::lock_guard<std::mutex> lk(job_mu);
  if (worker_error == nullptr) worker_error = std::current_exception();
}

void HybridAttention::Impl::HostWorkerLoop() {
  for (;;) {
    HostJob j;
    {
      std::unique_lock<std::mutex> lk(job_mu);
      job_cv.wait(lk, [&] { return worker_stop || !jobs.empty(); });
      if (jobs.empty()) return;  // (stopping)
      j = jobs.front();
      jobs.pop_front();
    }
    try {
      RunHostJob(j);  // (which catches what its parts throw, and writes the flag regardless)
    } catch (...) {
      KeepWorkerError();
    }
    WorkerAt(j.layer, kWorkerIdle);
    {
      std::lock_guard<std::mutex> lk(job_mu);
      ++jobs_done;
    }
    done_cv.notify_all();
  }
}

namespace {
// A partial of no keys: zeros, lse -inf (the merge then gives the GPU's alone).
void NoPartial(float* part, int64_t HD, int64_t heads) {
  std::fill(part, part + HD, 0.f);
  std::fill(part + HD, part + HD + heads, -INFINITY);
}
}  // namespace

void HybridAttention::Impl::WaitSelection(const HostJob& j) {
  const cudaEvent_t ready = host_layers[static_cast<size_t>(j.layer)].sel_ready;
  if (!post_sel) {
    NEEDLE_CUDA_CHECK(cudaEventSynchronize(ready));
    return;
  }
  // Spinning on the flag cuda::Post writes (a few microseconds after the selection), asking the
  // event now and then whether the GPU failed before it.
  const uint32_t* flag = sel_flags + j.layer;
  // (The flag holds a step's number, which wraps: reached when flag - seq >= 0 as a signed one.)
  const auto reached = [&] {
    return static_cast<int32_t>(__atomic_load_n(flag, __ATOMIC_ACQUIRE) - j.seq) >= 0;
  };
  for (uint32_t spins = 1; !reached(); ++spins) {
    if (spins % 4096 != 0) {
      __builtin_ia32_pause();
      continue;
    }
    const cudaError_t e = cudaEventQuery(ready);
    if (e == cudaErrorNotReady) continue;
    NEEDLE_CUDA_CHECK(e);
    // (The event follows the kernel: its flag is there.)
    if (reached()) break;
    Fail("hybrid engine: layer ", j.layer, "'s selection flag is ", *flag,
         " after the GPU wrote it for step ", j.seq);
  }
  handshake[j.layer * cuda::HandshakeClock::kWords + cuda::HandshakeClock::kSeen] =
      static_cast<uint64_t>(HostClockNs());
}

void HybridAttention::Impl::AttendHostJob(const HostJob& j, const HostSel& hs, float* part,
                                          float* sums) {
  const int64_t layer = j.layer, Hk = j.a.kv_heads, G = j.a.heads / Hk, n_sel = j.n_sel,
                HD = j.a.heads * j.a.head_dim;
  // The CPU's threads woken when the GPU finished the previous layer, as Attend does for the
  // host's own plans.
  auto t = Clock::now();
  WorkerAt(layer, kWorkerGpuWait);
  NEEDLE_CUDA_CHECK(cudaEventSynchronize(layer_start[static_cast<size_t>(layer)]));
  tc.Wake(400);
  WorkerAt(layer, kWorkerSelection);
  WaitSelection(j);
  worker_stats.gpu_wait += Since(t);
  WorkerAt(layer, kWorkerFold);
  cpu_blocks.resize(static_cast<size_t>(Hk));  // (the lists keep their capacity between layers)
  host_held.resize(static_cast<size_t>(Hk));
  int64_t n_cpu = 0;
  for (int64_t h = 0; h < Hk; ++h) {
    cpu_blocks[h].clear();
    host_held[h].clear();
    const int32_t cnt = hs.cpu[Hk * n_sel + h];
    NEEDLE_CHECK(cnt >= 0 && cnt <= n_sel);
    int32_t i = 0;
    for (int64_t x = 0; x < n_sel; ++x) {
      const int32_t b = hs.sel[h * n_sel + x];
      if (i < cnt && hs.cpu[h * n_sel + i] == x) {
        cpu_blocks[h].push_back(b);
        ++i;
      } else {
        host_held[h].push_back(b);
      }
    }
    n_cpu += cnt;
  }
  t = Clock::now();
  if (n_cpu > 0) {
    fast::AttendBlocks(hs.q, host.Layer(layer), j.a, cpu_blocks, part, part + HD, &block_stats, tc,
                       &worker_stats.fold);
    if (j.retain)  // (JoinHost puts them among the GPU's for the retention)
      std::copy_n(block_stats.data(), n_cpu * G * 2, sums);
  } else {
    NoPartial(part, HD, j.a.heads);
  }
  tc.Rest();  // (Wake's team served the fold's calls, or had none: back to sleep)
  worker_stats.cpu_attend += Since(t);
  worker_stats.cpu_blocks += n_cpu;
  worker_stats.gpu_blocks += Hk * n_sel - n_cpu;
}

void HybridAttention::Impl::RunHostJob(const HostJob& j) {
  const int64_t layer = j.layer, Hk = j.a.kv_heads, n_sel = j.n_sel, R = j.R,
                HD = j.a.heads * j.a.head_dim;
  HostLayer& hl = host_layers[static_cast<size_t>(layer)];
  const HostSel hs(hl.sel.Get(0), HD, Hk, n_sel, R);
  float* part = hl.part.Get(0);
  bool failed = false;
  {
    std::lock_guard<std::mutex> lk(job_mu);
    failed = worker_error != nullptr;
  }
  if (!failed) {
    try {
      AttendHostJob(j, hs, part, hl.sums.Get(0));
    } catch (...) {
      KeepWorkerError();
      failed = true;
    }
  }
  if (failed) {  // (the step goes on to its end without the CPU's part, and fails there)
    tc.Rest();
    NoPartial(part, HD, j.a.heads);
  }
  // The flag after the partial and the sums (x86 keeps stores in order; release for the
  // compiler and other CPUs): JoinHost's wait ends, the merge reads them.
  handshake[layer * cuda::HandshakeClock::kWords + cuda::HandshakeClock::kDone] =
      static_cast<uint64_t>(HostClockNs());
  __atomic_store_n(&host_flags[layer], j.seq, __ATOMIC_RELEASE);
  {
    std::lock_guard<std::mutex> lk(job_mu);
    ++jobs_attended;
  }
  done_cv.notify_all();
  if (failed) return;
  try {
    const auto t = Clock::now();
    WorkerAt(layer, kWorkerFill);
    QueueMapFill(layer);
    worker_stats.copies += Since(t);
    if (!j.want_plan) return;
    LayerPlan& plan = host_plans[static_cast<size_t>(layer)];
    plan.blocks.assign(static_cast<size_t>(Hk), {});
    for (int64_t h = 0; h < Hk; ++h)
      plan.blocks[h].assign(hs.sel + h * n_sel, hs.sel + (h + 1) * n_sel);
    // (The kept retention: what the selection started from, as PlanDecode reports it.)
    plan.retained.clear();
    if (hs.kept[Hk * R] >= 0)
      for (int64_t h = 0; h < Hk; ++h)
        plan.retained.emplace_back(hs.kept + h * R, hs.kept + h * R + hs.kept[Hk * R + h]);
  } catch (...) {
    KeepWorkerError();
  }
}

}  // namespace needle
