// The hybrid engine (--device cuda --attention sparse, engine/cuda/hybrid.h) end to end on a
// --dummy-weights model (bench/configs), beside needle's dense all-GPU path where its KV fits.
// One JSON object per line on stdout:
//   {"bench":"hybrid", "config", "prompt", "mode": "hybrid"|"dense", "prefill_tok/s",
//    "decode_tok/s", "gpu_used_GiB" (device memory in use after decode, from cudaMemGetInfo,
//    this process's allocations and the CUDA context), "host_peak_GiB" (VmHWM),
//    per decode step in ms: "plan", "cpu_attend", "copies", "gpu_wait", and "other" (the rest:
//    the GPU's work that is not waited for, launches, sampling)}
// Usage: bench_hybrid GPU_MEMORY CONTEXTS config.json ...   e.g. 24G 32768,131072 qwen.json
//   NEEDLE_BENCH_DENSE_MAX: the longest context the dense path is also run at (default 131072);
//   NEEDLE_BENCH_RETAIN: retain_blocks of the sparse settings (default: SparseConfig's).
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/base/error.h"
#include "engine/base/threading.h"
#include "engine/cuda/cuda_backend.h"
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

void Run(Backend& gpu, Model& model, const std::string& name, int64_t P, bool hybrid,
         size_t gpu_memory, ThreadingContext& tc) {
  SparseConfig sc;  // the defaults: Quest, topk 32 of 128-token blocks, local 4096, 2 dense
  if (const char* r = std::getenv("NEEDLE_BENCH_RETAIN")) sc.retain_blocks = std::stoll(r);
  SequenceOptions so;
  so.ctx = P + 64;
  so.kv_type = DType::kBF16;
  so.gpu_memory = gpu_memory;
  so.ubatch = 4096;
  model.set_ubatch(so.ubatch);
  SequenceAttention seq = MakeSequenceAttention(model, hybrid ? &sc : nullptr, tc, so);
  if (hybrid) std::fprintf(stderr, "bench_hybrid: %s\n", seq.gpu_memory.c_str());
  model.set_attention(seq.policy.get());
  std::vector<int32_t> ids(static_cast<size_t>(P));
  for (int64_t i = 0; i < P; ++i) ids[i] = static_cast<int32_t>((i * 7919) % 30000 + 10);
  const auto t0 = std::chrono::steady_clock::now();
  int32_t tok = model.ForwardGreedy(ids.data(), P, *seq.cache);
  const double pre = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  tok = model.ForwardGreedy(&tok, 1, *seq.cache) % 30000 + 10;  // warm-up step
  HybridStats before;
  SparseAttention::Times tb;
  auto* h = dynamic_cast<HybridAttention*>(seq.policy.get());
  if (h != nullptr) before = h->stats(), tb = seq.planner->times();
  const int steps = 32;
  const auto t2 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) tok = model.ForwardGreedy(&tok, 1, *seq.cache) % 30000 + 10;
  const double dec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t2).count();
  std::ostringstream split;
  if (h != nullptr) {
    const HybridStats& a = h->stats();
    const double n = steps, ms = 1e3;
    const double plan = (a.plan - before.plan) / n * ms,
                 cpu = (a.cpu_attend - before.cpu_attend) / n * ms,
                 cp = (a.copies - before.copies) / n * ms,
                 wait = (a.gpu_wait - before.gpu_wait) / n * ms;
    const SparseAttention::Times& ta = seq.planner->times();
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  ",\"reps_ms\":%.3f,\"select_ms\":%.3f,\"retain_ms\":%.3f,\"plan_ms\":%.3f,\"cpu_"
                  "attend_ms\":%.3f,\"copies_ms\":%.3f,\"gpu_wait_ms\":%."
                  "3f,\"other_ms\":%.3f",
                  (ta.reps - tb.reps) / n * ms, (ta.select - tb.select) / n * ms,
                  (ta.retain - tb.retain) / n * ms, plan, cpu, cp, wait,
                  dec / n * ms - plan - cpu - cp - wait);
    split << buf;
  }
  std::printf(
      "{\"bench\":\"hybrid\",\"config\":\"%s\",\"prompt\":%lld,\"mode\":\"%s\",\"prefill_tok/"
      "s\":%.0f,\"decode_tok/s\":%.2f,\"gpu_used_GiB\":%.2f,\"host_peak_GiB\":%.2f%s}\n",
      name.c_str(), static_cast<long long>(P), hybrid ? "hybrid" : "dense", P / pre, steps / dec,
      GpuUsedGiB(), HostPeakGiB(), split.str().c_str());
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
    std::vector<int64_t> ctxs;
    std::stringstream ss(argv[2]);
    for (std::string x; std::getline(ss, x, ',');) ctxs.push_back(std::stoll(x));
    const char* dm = std::getenv("NEEDLE_BENCH_DENSE_MAX");
    const int64_t dense_max = dm != nullptr ? std::stoll(dm) : 131072;
    auto gpu = MakeCudaBackend(0);
    ThreadingContext tc(0);
    for (int i = 3; i < argc; ++i) {
      const std::string config = argv[i];
      auto model = MakeDummyModel(config, DType::kBF16, *gpu, tc);
      const std::string name = config.substr(config.rfind('/') + 1);
      for (int64_t P : ctxs) {
        Run(*gpu, *model, name, P, true, gpu_memory, tc);
        if (P <= dense_max) Run(*gpu, *model, name, P, false, 0, tc);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_hybrid: %s\n", e.what());
    return 1;
  }
  return 0;
}
