// The hybrid engine (--device cuda --attention sparse, engine/cuda/hybrid.h) end to end on a
// --dummy-weights model (bench/configs), beside needle's dense all-GPU path where its KV fits.
// One JSON object per line on stdout:
//   {"bench":"hybrid", "config", "prompt", "mode": "hybrid"|"dense", "prefill_tok/s",
//    "decode_tok/s", "decode" (NEEDLE_BENCH_DECODE), "gpu_used_GiB" (device memory in use after
//    decode, from cudaMemGetInfo,
//    this process's allocations and the CUDA context), "host_peak_GiB" (VmHWM),
//    per decode step in ms: "plan", "cpu_attend" (what is left of the CPU's blocks once the
//    host has queued the GPU's share: they start first), "copies", "gpu_wait" (of which
//    "gpu_wait_part": for the GPU's partial once the CPU's blocks were done; of "plan":
//    "gather_ms" and "launch_ms", HybridStats' gather and launch), and "other" (the
//    rest: the GPU's work that is not waited for, launches, sampling). Where a host worker
//    runs (the GPU planning host placement), "cpu_attend", "copies" and "gpu_wait" are the
//    worker's, beside the model's thread, "host_wait" the model's thread waiting for it, and
//    "other" the step less "plan" and "host_wait"; the worker's CPU attention by phase,
//    "fold_setup_ms", "fold_start_ms" (its threads' start), "fold_run_ms", "fold_merge_ms",
//    "fold_last_ms" (of run: until its last item ended), "fold_busy_ms" (the items' own times
//    added over the threads), and a call's "fold_items", "fold_chunks" (taken by the threads)
//    and "fold_threads" (that took any);
//    the handshake with it as the GPU sees it (Post on): "join_idle_ms" (the GPU waiting for
//    the worker), "join_span_ms" (selection's flag to the end of that wait), "join_host_ms" (of
//    it, the worker's own), "handshake_ms" (the rest: the two flags' crossings), and each
//    crossing's mean beyond its fastest, "to_host_late_us" (the worker seeing the selection),
//    "to_gpu_late_us" (the GPU seeing the worker's flag), with "round_fastest_us" (the two
//    fastest added: the clocks' offset cancels), us a layer}
// Usage: bench_hybrid GPU_MEMORY CONTEXTS config.json ...   e.g. 24G 32768,131072 qwen.json
//   A context with the suffix s (1048576s) is synthetic: its keys and values are written into the
//   caches (pseudo-random in host memory, a constant on the GPU) instead of prefilled, for
//   lengths whose prefill would take longer than the device time allows ("prefill_tok/s": null).
//   Decode reads and selects from it exactly as from a prefilled one.
//   NEEDLE_BENCH_DENSE_MAX: the longest context the dense path is also run at (default 131072);
//   NEEDLE_BENCH_RETAIN: retain_blocks of the sparse settings (default: SparseConfig's).
//   NEEDLE_BENCH_SPARSE: more sparse settings by their needle flags, applied after the defaults
//   and before the above, e.g. dense-layers=0,select=layer; lines add "sparse" (as given).
//   NEEDLE_BENCH_GPU_CACHES: gpu_cache_blocks values likewise (e.g. 0,64), within each share.
//   NEEDLE_BENCH_GPU_SHARES: gpu_share values to run the hybrid with, one after the other in the
//   same process (e.g. 0,50; default: SparseConfig's). Its lines add "gpu_share", "gpu_slots"
//   (the extra GPU slots a sparse layer has: SparseConfig::GpuContextSlots), "gpu_blocks"
//   (the share of Context blocks the GPU attended), "gpu_reused" (the share of those already in
//   GPU memory from an earlier step, not read over PCIe), "gpu_filled" (the share of Context
//   blocks the CPU attended and the GPU then copied for later steps) and "setup_s" (the synthetic
//   context's indexing and page-locking, or the prefill). NEEDLE_BENCH_PREFILLS: how the hybrid
//   prefills, one run after the other: dense (default) and/or sparse (--prefill sparse,
//   SparseConfig's chunk), e.g. dense,sparse; NEEDLE_BENCH_REMAP=1 adds
//   --pos-remap block to the sparse runs. Hybrid lines add "prefill": "dense" | "sparse" |
//   "sparse+remap", and the prompt's host time in seconds: "prompt_pin_s" (page-locking the
//   host cache), "prompt_wait_s" (waiting for the GPU before planning), "prompt_plan_s" (the
//   planner, queuing the chunks' attention included).
//   NEEDLE_BENCH_PLACEMENTS: --kv-placement values to run the hybrid with, one after the other
//   (e.g. host,device; default auto; none: the dense path alone). Hybrid lines add "placement":
//   what was used.
//   NEEDLE_BENCH_DECODE: the decode steps' tokens: greedy (default; the dummy weights' next
//   token) or repeat (the same token every step: queries that change little, as a real text's;
//   the GPU block cache's favourable case). Lines add "decode".
//   NEEDLE_BENCH_THREADS: the CPU threads (default: all the machine's, as needle's --threads).
//   NEEDLE_BENCH_BATCH: batch sizes (e.g. 1,2,4): instead of the above, that many hybrid
//   sequences at every (synthetic) context decoding together (RunBatch below).
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/base/error.h"
#include "engine/base/switches.h"
#include "engine/base/threading.h"
#include "engine/cli/run_options.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/hybrid.h"
#include "engine/model/model.h"
#include "engine/runtime/sequence_attention.h"

namespace needle {
namespace {

double HostPeakGiB() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / (1024.0 * 1024.0);
  return 0;
}
double GpuUsedGiB() {
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  return static_cast<double>(total_b - free_b) / (1 << 30);
}

// Fills blocks [0, P) of `layer` of a cache with `fill` (cudaMemset bytes for a device cache,
// pseudo-random bf16 with magnitudes 0.25..4 for a host one), assigning them first.
void FillLayer(KVCache& cache, int64_t layer, int64_t P, ThreadingContext& tc) {
  cache.AssignBlocks(layer, 0, P);
  const int64_t nb = (P + cache.shape().block_size - 1) / cache.shape().block_size;
  const size_t bb = cache.BlockBytes();
  if (!cache.on_host()) {
    for (int64_t b = 0; b < nb;) {  // consecutive slots in one memset
      const int32_t s0 = cache.SlotOf(layer, b);
      int64_t n = 1;
      while (b + n < nb && cache.SlotOf(layer, b + n) == s0 + n) ++n;
      for (bool v : {false, true})
        NEEDLE_CUDA_CHECK(cudaMemset(cache.BlockData(layer, v, s0), 0x3c, bb * n));
      b += n;
    }
    return;
  }
  tc.ParallelFor(static_cast<size_t>(nb), 16, [&](size_t b0, size_t b1) {
    for (size_t b = b0; b < b1; ++b) {
      uint64_t x = 0x9e3779b97f4a7c15ull * (b + 1) + static_cast<uint64_t>(layer);
      for (bool v : {false, true}) {
        auto* p = reinterpret_cast<uint16_t*>(
            cache.BlockData(layer, v, cache.SlotOf(layer, static_cast<int64_t>(b))));
        for (size_t i = 0; i < bb / 2; ++i) {
          x ^= x << 13, x ^= x >> 7, x ^= x << 17;
          // sign, exponent 125..128, 7 mantissa bits
          p[i] = static_cast<uint16_t>(((x & 1) << 15) | ((125 + ((x >> 1) & 3)) << 7) |
                                       ((x >> 3) & 0x7f));
        }
      }
    }
  });
}

// A synthetic context of P tokens in a sequence's caches (the hybrid's host cache for its sparse
// layers), adopted as if prefilled.
void Synthesize(Model& model, const SparseConfig& sc, SequenceAttention& seq, int64_t P,
                ThreadingContext& tc) {
  auto* h = dynamic_cast<HybridAttention*>(seq.policy.get());
  for (int64_t l = 0; l < model.config().num_layers; ++l) {
    if (h == nullptr || HybridDenseLayer(model.config(), sc, l))
      FillLayer(*seq.cache, l, P, tc);
    else
      FillLayer(h->host_cache(), l, P, tc);
  }
  if (h != nullptr)
    h->AdoptContext(*seq.cache, P);
  else
    seq.cache->SetSize(P);
}

// NEEDLE_BENCH_BATCH: n hybrid sequences at once, as the Engine's slots run them (needle serve
// --max-batch n): each with caches of its own holding a synthetic context of P tokens, every
// slot's GPU memory counted against one budget (SequenceOptions::gpu_taken), their rows decoded
// in one Model::ForwardBatch a step on the batch kernels. One line: {"bench":"hybrid_batch",
// "config", "prompt", "batch", "placement", "step_ms", "decode_tok/s" (all sequences),
// "gpu_used_GiB", "host_peak_GiB"}.
void RunBatch(Backend& gpu, Model& model, const std::string& name, int64_t P, int64_t n,
              size_t gpu_memory, KVPlacement placement, ThreadingContext& tc) {
  SparseConfig sc;
  std::vector<SequenceAttention> seqs;
  size_t taken = 0;
  for (int64_t i = 0; i < n; ++i) {
    SequenceOptions so;
    so.ctx = P + 64, so.kv_type = DType::kBF16, so.gpu_memory = gpu_memory, so.ubatch = 4096;
    so.placement = placement, so.gpu_taken = taken, so.sequences = n;
    seqs.push_back(MakeSequenceAttention(model, &sc, tc, so));
    taken += seqs.back().gpu_bytes;
    Synthesize(model, sc, seqs.back(), P, tc);
  }
  gpu.PreferBatchKernels(true);
  std::vector<KVCache*> caches;
  std::vector<AttentionPolicy*> policies;
  for (auto& s : seqs) caches.push_back(s.cache.get()), policies.push_back(s.policy.get());
  std::vector<int32_t> ids(static_cast<size_t>(n), 11), next(static_cast<size_t>(n));
  const auto step = [&] {
    model.ForwardBatch(ids.data(), n, caches.data(), next.data(), nullptr, policies.data());
    for (int64_t i = 0; i < n; ++i) ids[i] = next[i] % 30000 + 10;
  };
  step();  // (warm-up)
  const int steps = 16;
  const auto t = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) step();
  const double dec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  std::printf(
      "{\"bench\":\"hybrid_batch\",\"config\":\"%s\",\"prompt\":%lld,\"batch\":%lld,"
      "\"placement\":\"%s\",\"step_ms\":%.3f,\"decode_tok/s\":%.2f,\"gpu_used_GiB\":%.2f,"
      "\"host_peak_GiB\":%.2f}\n",
      name.c_str(), static_cast<long long>(P), static_cast<long long>(n),
      seqs[0].device_kv ? "device" : "host", dec / steps * 1e3, n * steps / dec, GpuUsedGiB(),
      HostPeakGiB());
  std::fflush(stdout);
  gpu.PreferBatchKernels(false);
}

// NEEDLE_BENCH_DECODE: greedy (unset) or repeat; anything else is an error naming it.
bool DecodeRepeats() {
  const char* d = std::getenv("NEEDLE_BENCH_DECODE");
  if (d == nullptr || std::string(d) == "greedy") return false;
  if (std::string(d) == "repeat") return true;
  Fail("NEEDLE_BENCH_DECODE: '", d, "' is neither greedy nor repeat");
}

void Run(Backend& gpu, Model& model, const std::string& name, int64_t P, bool synthetic,
         bool hybrid, size_t gpu_memory, int64_t gpu_share, int64_t gpu_cache, bool sparse_prefill,
         KVPlacement placement, ThreadingContext& tc) {
  SparseConfig sc;  // the defaults: Quest, topk 32 of 128-token blocks, local 4096, 2 dense
  const char* settings = std::getenv("NEEDLE_BENCH_SPARSE");
  if (settings != nullptr) {
    std::stringstream list(settings);
    for (std::string kv; std::getline(list, kv, ',');) {
      const size_t eq = kv.find('=');
      if (eq == std::string::npos)
        Fail("NEEDLE_BENCH_SPARSE: '", kv, "' is not FLAG=VALUE (e.g. dense-layers=0)");
      ApplySparseSetting(&sc, kv.substr(0, eq), kv.substr(eq + 1));
    }
  }
  if (const char* r = std::getenv("NEEDLE_BENCH_RETAIN")) sc.retain_blocks = std::stoll(r);
  if (gpu_share >= 0) sc.gpu_share = gpu_share;
  if (gpu_cache >= 0) sc.gpu_cache_blocks = gpu_cache;
  sc.sparse_prefill = sparse_prefill;
  const char* remap = std::getenv("NEEDLE_BENCH_REMAP");
  sc.pos_remap = sparse_prefill && remap != nullptr && std::string(remap) == "1";
  SequenceOptions so;
  so.ctx = P + 64;
  so.kv_type = DType::kBF16;
  so.gpu_memory = gpu_memory;
  so.ubatch = 4096;
  so.placement = placement;
  model.set_ubatch(so.ubatch);
  SequenceAttention seq = MakeSequenceAttention(model, hybrid ? &sc : nullptr, tc, so);
  if (hybrid)
    std::fprintf(stderr, "bench_hybrid: %s; %s\n", seq.placement.c_str(), seq.gpu_memory.c_str());
  model.set_attention(seq.policy.get());
  std::vector<int32_t> ids(static_cast<size_t>(P));
  for (int64_t i = 0; i < P; ++i) ids[i] = static_cast<int32_t>((i * 7919) % 30000 + 10);
  const auto t0 = std::chrono::steady_clock::now();
  int32_t tok = 11;
  auto* h = dynamic_cast<HybridAttention*>(seq.policy.get());
  if (!synthetic)
    tok = model.ForwardGreedy(ids.data(), P, *seq.cache);
  else
    Synthesize(model, sc, seq, P, tc);
  const double pre = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  tok = model.ForwardGreedy(&tok, 1, *seq.cache) % 30000 + 10;  // warm-up step
  HybridStats before;
  SparseAttention::Times tb;
  if (h != nullptr) h->SyncStats(), before = h->stats(), tb = seq.planner->times();
  const int steps = 32;
  const auto t2 = std::chrono::steady_clock::now();
  // NEEDLE_BENCH_DECODE=repeat: every step feeds the warm-up step's token again, so that the
  // queries (and the selection) change little from step to step, as a real text's do
  // (scripts/plan_overlap.py); greedy (the default): the dummy weights' next token, whose
  // queries share little with the step before beyond the retained blocks.
  const bool repeat = DecodeRepeats();
  for (int s = 0; s < steps; ++s) {
    const int32_t next = model.ForwardGreedy(&tok, 1, *seq.cache) % 30000 + 10;
    if (!repeat) tok = next;
  }
  const double dec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t2).count();
  if (h != nullptr) h->SyncStats();  // (after the clock: the steps' own work is done)
  std::ostringstream split;
  if (h != nullptr) {
    const HybridStats& a = h->stats();
    const double n = steps, ms = 1e3;
    const double plan = (a.plan - before.plan) / n * ms,
                 cpu = (a.cpu_attend - before.cpu_attend) / n * ms,
                 cp = (a.copies - before.copies) / n * ms,
                 wait = (a.gpu_wait - before.gpu_wait) / n * ms,
                 host_wait = (a.host_wait - before.host_wait) / n * ms;
    // (A host worker's times overlap the model's thread's: its waits for the worker instead.)
    const double other = dec / n * ms - plan - (host_wait > 0 ? host_wait : cpu + cp + wait);
    const SparseAttention::Times& ta = seq.planner->times();
    char buf[900];
    const double gb = static_cast<double>(a.gpu_blocks - before.gpu_blocks),
                 cb = static_cast<double>(a.cpu_blocks - before.cpu_blocks),
                 gr = static_cast<double>(a.gpu_reused - before.gpu_reused);
    std::snprintf(
        buf, sizeof buf,
        ",\"placement\":\"%s\",\"prefill\":\"%s\",\"prompt_pin_s\":%.2f,\"prompt_wait_s\":%.2f,"
        "\"prompt_plan_s\":%.2f,\"gpu_share\":%lld,\"gpu_slots\":%lld,\"gpu_blocks\":%.3f,"
        "\"gpu_reused\":%."
        "3f,\"setup_s\":%.1f"
        ",\"reps_ms\":%.3f,\"select_ms\":%.3f,\"retain_ms\":%.3f,\"plan_ms\":%.3f,\"cpu_"
        "attend_ms\":%.3f,\"copies_ms\":%.3f,\"gpu_wait_ms\":%."
        "3f,\"gpu_wait_part_ms\":%.3f,\"other_ms\":%.3f,\"enqueue_ms\":%.3f",
        seq.device_kv ? "device" : "host",
        !sc.sparse_prefill ? "dense"
        : sc.pos_remap     ? "sparse+remap"
                           : "sparse",
        a.prompt_pin, a.prompt_wait, a.prompt_plan, static_cast<long long>(sc.gpu_share),
        static_cast<long long>(h->gpu_slots()), gb + cb > 0 ? gb / (gb + cb) : 0.0,
        gb > 0 ? gr / gb : 0.0, pre, (ta.reps - tb.reps) / n * ms, (ta.select - tb.select) / n * ms,
        (ta.retain - tb.retain) / n * ms, plan, cpu, cp, wait,
        (a.gpu_wait_part - before.gpu_wait_part) / n * ms, other,
        (a.enqueue - before.enqueue) / n * ms);
    split << buf << ",\"gpu_filled\":"
          << (gb + cb > 0 ? static_cast<double>(a.gpu_filled - before.gpu_filled) / (gb + cb) : 0.0)
          << ",\"gather_ms\":" << (a.gather - before.gather) / n * ms
          << ",\"launch_ms\":" << (a.launch - before.launch) / n * ms
          << ",\"host_wait_ms\":" << host_wait;
    // The worker's CPU attention by phase, and the GPU's handshake with it (HybridStats).
    const std::pair<const char*, double> more[] = {
        {"fold_setup_ms", a.fold.setup - before.fold.setup},
        {"fold_start_ms", a.fold.start - before.fold.start},
        {"fold_run_ms", a.fold.fold - before.fold.fold},
        {"fold_merge_ms", a.fold.merge - before.fold.merge},
        {"fold_last_ms", a.fold.last - before.fold.last},
        {"fold_busy_ms", a.fold.busy - before.fold.busy},
        {"join_idle_ms", a.join_idle - before.join_idle},
        {"join_span_ms", a.join_span - before.join_span},
        {"join_host_ms", a.join_host - before.join_host},
        {"handshake_ms", a.handshake - before.handshake}};
    for (const auto& [k, v] : more) split << ",\"" << k << "\":" << v / n * ms;
    // (Counts a call: items, chunks taken, threads that took any.)
    if (const double calls = a.fold.calls - before.fold.calls; calls > 0)
      split << ",\"fold_items\":" << (a.fold.items - before.fold.items) / calls
            << ",\"fold_chunks\":" << (a.fold.chunks - before.fold.chunks) / calls
            << ",\"fold_threads\":" << (a.fold.threads - before.fold.threads) / calls;
    // Each crossing's mean beyond its fastest, and the fastest round (us a handshake).
    if (const auto hn = static_cast<double>(a.handshakes - before.handshakes); hn > 0) {
      split << ",\"to_host_late_us\":"
            << ((a.to_host - before.to_host) / hn - a.to_host_least) * 1e6
            << ",\"to_gpu_late_us\":" << ((a.to_gpu - before.to_gpu) / hn - a.to_gpu_least) * 1e6
            << ",\"round_fastest_us\":" << (a.to_host_least + a.to_gpu_least) * 1e6;
    }
    buf[0] = 0;
    // NEEDLE_HYBRID_PROFILE=1: GPU time per phase of the GPU-planned layers, ms per step.
    double phases = 0;
    for (double x : a.gpu_phase) phases += x;
    if (phases > 0) {
      split << buf << ",\"gpu_phase_ms\":{";
      for (int i = 0; i < HybridStats::kPhases; ++i)
        split << (i ? "," : "") << '"' << HybridStats::PhaseName(i)
              << "\":" << (a.gpu_phase[i] - before.gpu_phase[i]) / n * ms;
      split << "},\"rep_checks\":" << static_cast<double>(a.rep_checks - before.rep_checks) / n
            << ",\"rep_blocks\":" << static_cast<double>(a.rep_blocks - before.rep_blocks) / n
            << ",\"rep_host_ms\":" << (a.rep_host - before.rep_host) / n * ms;
      buf[0] = 0;
    }
    split << buf;
  }
  std::printf(
      "{\"bench\":\"hybrid\",\"config\":\"%s\",\"prompt\":%lld,\"mode\":\"%s\",\"synthetic\":%s,"
      "\"prefill_tok/s\":%s,\"decode_tok/"
      "s\":%.2f,\"decode\":\"%s\",\"sparse\":\"%s\",\"gpu_used_GiB\":%.2f,\"host_peak_GiB\":%.2f%s}"
      "\n",
      name.c_str(), static_cast<long long>(P), hybrid ? "hybrid" : "dense",
      synthetic ? "true" : "false",
      synthetic ? "null" : std::to_string(static_cast<long long>(P / pre)).c_str(), steps / dec,
      repeat ? "repeat" : "greedy", settings != nullptr ? settings : "", GpuUsedGiB(),
      HostPeakGiB(), split.str().c_str());
  std::fflush(stdout);
  model.set_attention(nullptr);
}

}  // namespace
}  // namespace needle

int main(int argc, char** argv) {
  using namespace needle;
  try {
    if (argc < 4) Fail("usage: bench_hybrid GPU_MEMORY CONTEXTS config.json ...");
    const size_t gpu_memory = ParseByteSize(argv[1], "GPU_MEMORY");
    std::vector<std::pair<int64_t, bool>> ctxs;  // (tokens, synthetic)
    std::stringstream ss(argv[2]);
    for (std::string x; std::getline(ss, x, ',');) {
      const bool syn = !x.empty() && x.back() == 's';
      if (syn) x.pop_back();
      ctxs.push_back({std::stoll(x), syn});
    }
    const char* dm = std::getenv("NEEDLE_BENCH_DENSE_MAX");
    const int64_t dense_max = dm != nullptr ? std::stoll(dm) : 131072;
    std::vector<bool> prefills = {false};  // sparse prefill
    if (const char* p = std::getenv("NEEDLE_BENCH_PREFILLS")) {
      prefills.clear();
      std::stringstream ps(p);
      for (std::string x; std::getline(ps, x, ',');) {
        if (x != "dense" && x != "sparse")
          Fail("NEEDLE_BENCH_PREFILLS: '", x, "' is neither dense nor sparse");
        prefills.push_back(x == "sparse");
      }
    }
    std::vector<int64_t> shares = {-1};  // -1: SparseConfig's default
    if (const char* g = std::getenv("NEEDLE_BENCH_GPU_SHARES")) {
      shares.clear();
      std::stringstream gs(g);
      for (std::string x; std::getline(gs, x, ',');) shares.push_back(std::stoll(x));
    }
    std::vector<int64_t> caches = {-1};  // -1: SparseConfig's default
    if (const char* g = std::getenv("NEEDLE_BENCH_GPU_CACHES")) {
      caches.clear();
      std::stringstream gs(g);
      for (std::string x; std::getline(gs, x, ',');) caches.push_back(std::stoll(x));
    }
    std::vector<KVPlacement> placements = {KVPlacement::kAuto};
    if (const char* g = std::getenv("NEEDLE_BENCH_PLACEMENTS")) {
      placements.clear();
      std::stringstream gs(g);
      for (std::string x; std::getline(gs, x, ',');)
        if (x != "none") placements.push_back(ParseKVPlacement(x, "NEEDLE_BENCH_PLACEMENTS"));
    }
    std::vector<int64_t> batches;  // NEEDLE_BENCH_BATCH: batches of hybrid sequences instead
    if (const char* g = std::getenv("NEEDLE_BENCH_BATCH")) {
      std::stringstream gs(g);
      for (std::string x; std::getline(gs, x, ',');) batches.push_back(std::stoll(x));
    }
    auto gpu = MakeCudaBackend(0);
    ThreadingContext tc(EnvSwitch("NEEDLE_BENCH_THREADS", 0));
    for (int i = 3; i < argc; ++i) {
      const std::string config = argv[i];
      auto model = MakeDummyModel(config, DType::kBF16, *gpu, tc);
      const std::string name = config.substr(config.rfind('/') + 1);
      for (auto [P, syn] : ctxs) {
        if (!batches.empty()) {
          for (KVPlacement pl : placements)
            for (int64_t n : batches) RunBatch(*gpu, *model, name, P, n, gpu_memory, pl, tc);
          continue;
        }
        for (KVPlacement pl : placements)
          for (bool sp : prefills)
            for (int64_t share : shares)
              for (int64_t cache : caches)
                Run(*gpu, *model, name, P, syn, true, gpu_memory, share, cache, sp, pl, tc);
        if (P <= dense_max)
          Run(*gpu, *model, name, P, syn, false, 0, -1, -1, false, KVPlacement::kAuto, tc);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_hybrid: %s\n", e.what());
    return 1;
  }
  return 0;
}
