// Batched decode (Model::ForwardBatch, issue 19): aggregate tokens/s of n sequences decoding
// together over one KV BlockPool, --dummy-weights bf16 models of real shapes (bench/configs),
// each sequence at a context of CONTEXT tokens (synthetic: its blocks assigned, not prefilled;
// decode reads them alike), against one step's bound: every weight read once plus every
// sequence's K/V, at the machine's measured read bandwidth (DRAM on the CPU, HBM on the GPU).
// The backend's batch kernels (Backend::PreferBatchKernels), as the Engine runs them, unless
// NEEDLE_BENCH_BATCH_KERNELS=0 (the one-row kernels of needle generate, for comparison).
// One JSON object per batch size on stdout:
//   {"bench":"batch", "device", "config", "kernels" (batch or one-row), "context", "batch",
//    "step_ms", "tok/s" (all sequences),
//    "speedup" (over batch 1 in the same run), "bound_ms", "of_bound"}; after the largest batch,
//   {"bench":"swap", ...}: one sequence's blocks swapped out to host memory and back (the Engine's
//   preemption), "GB", "out_ms", "in_ms", their GB/s, and both as steps of that batch; then
//   again into the buffer the first left ("again_...": the Engine reuses it).
// Usage: bench_batch cpu|cuda CONFIG CONTEXT BATCHES [STEPS]   e.g. cuda qwen2.5-7b.json 4096
// 1,4,16
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "engine/base/error.h"
#include "engine/model/model.h"
#include "kvcache/block_pool.h"
#ifdef NEEDLE_HAVE_CUDA
#include "bench/bench_floors.h"
#include "engine/cuda/cuda_backend.h"
#endif

int main(int argc, char** argv) {
  using namespace needle;
  try {
    if (argc < 5) Fail("usage: bench_batch cpu|cuda CONFIG CONTEXT BATCHES [STEPS]");
    const std::string device = argv[1], config = argv[2];
    const int64_t ctx = std::stoll(argv[3]), steps = argc > 5 ? std::stoll(argv[5]) : 16;
    std::vector<int64_t> batches;
    std::stringstream ss(argv[4]);
    for (std::string x; std::getline(ss, x, ',');) batches.push_back(std::stoll(x));
    ThreadingContext& tc = bench::BenchContext();
    std::unique_ptr<Backend> backend;
    double peak = 0;  // GB/s
    if (device == "cpu") {
      backend = MakeCpuBackend(tc, false);
      peak = bench::MeasuredReadBandwidth() / 1e9;
    } else if (device == "cuda") {
#ifdef NEEDLE_HAVE_CUDA
      backend = MakeCudaBackend(0);
      peak = bench::ReadBandwidthGBs(CudaBackendStream(*backend));
#else
      Fail("bench_batch: built without CUDA");
#endif
    } else {
      Fail("bench_batch: device '", device, "' is neither cpu nor cuda");
    }
    auto model = MakeDummyModel(config, DType::kBF16, *backend, tc);
    const ModelConfig& c = model->config();
    const char* bk = std::getenv("NEEDLE_BENCH_BATCH_KERNELS");
    const bool batch_kernels = bk == nullptr || std::string(bk) != "0";
    backend->PreferBatchKernels(batch_kernels);
    const double weights =
        static_cast<double>(model->weights().TotalBytes() - model->weights().embed.nbytes());
    int64_t max_b = 1;
    for (int64_t b : batches) max_b = std::max(max_b, b);
    const int64_t B = 128, per_seq = (ctx + steps + 1 + B - 1) / B * B;  // whole blocks
    BlockPool pool(model->CacheShape(max_b * per_seq, DType::kBF16, B), 0, backend->kv_memory());
    double base = 0;
    for (int64_t b : batches) {
      std::vector<std::unique_ptr<KVCache>> caches;
      std::vector<KVCache*> ptrs;
      for (int64_t i = 0; i < b; ++i) {
        caches.push_back(std::make_unique<KVCache>(pool, ctx + steps + 1));
        for (int64_t l = 0; l < c.num_layers; ++l) caches.back()->AssignBlocks(l, 0, ctx);
        caches.back()->SetSize(ctx);
        ptrs.push_back(caches.back().get());
      }
      std::vector<int32_t> ids(static_cast<size_t>(b), 11), next(static_cast<size_t>(b));
      model->ForwardBatch(ids.data(), b, ptrs.data(), next.data());  // warm-up
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t s = 0; s < steps; ++s) {
        for (int64_t i = 0; i < b; ++i) ids[i] = (next[i] % 1000) + 10;
        model->ForwardBatch(ids.data(), b, ptrs.data(), next.data());
      }
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
          static_cast<double>(steps);
      const double tps = 1e3 * static_cast<double>(b) / ms;
      if (base == 0) base = tps / static_cast<double>(b);
      const double kv = static_cast<double>(b) * static_cast<double>(ctx) *
                        static_cast<double>(model->CacheShape(1, DType::kBF16).BytesPerToken());
      const double bound_ms = (weights + kv) / (peak * 1e6);
      std::printf(
          "{\"bench\":\"batch\",\"device\":\"%s\",\"config\":\"%s\",\"kernels\":\"%s\","
          "\"context\":%lld,\"batch\":%lld,"
          "\"step_ms\":%.3f,\"tok/s\":%.1f,\"speedup\":%.2f,\"read_GB/s\":%.0f,\"bound_ms\":%.3f,"
          "\"of_bound\":%.2f}\n",
          device.c_str(), config.substr(config.rfind('/') + 1).c_str(),
          batch_kernels ? "batch" : "one-row", static_cast<long long>(ctx),
          static_cast<long long>(b), ms, tps, tps / base, peak, bound_ms, bound_ms / ms);
      std::fflush(stdout);
      if (b != max_b) continue;
      // Preemption's cost (Engine::Schedule): one sequence's blocks out of the pool into host
      // memory and back (KVCache::SwapOut / SwapIn), against the step.
      // Twice: into a fresh buffer, then into the one the first swap left (as the Engine reuses
      // it: "again").
      SwappedBlocks sw;
      double out_ms[2], in_ms[2], gb = 0;
      for (int round = 0; round < 2; ++round) {
        const auto s0 = std::chrono::steady_clock::now();
        caches[0]->SwapOut(&sw);
        const auto s1 = std::chrono::steady_clock::now();
        gb = static_cast<double>(sw.bytes) / 1e9;
        caches[0]->SwapIn(&sw);
        const auto s2 = std::chrono::steady_clock::now();
        out_ms[round] = std::chrono::duration<double, std::milli>(s1 - s0).count();
        in_ms[round] = std::chrono::duration<double, std::milli>(s2 - s1).count();
      }
      std::printf(
          "{\"bench\":\"swap\",\"device\":\"%s\",\"config\":\"%s\",\"context\":%lld,\"GB\":%.3f,"
          "\"out_ms\":%.2f,\"in_ms\":%.2f,\"out_GB/s\":%.1f,\"in_GB/s\":%.1f,"
          "\"steps_of_batch\":%.1f,\"again_out_ms\":%.2f,\"again_in_ms\":%.2f,"
          "\"again_out_GB/s\":%.1f,\"again_in_GB/s\":%.1f}\n",
          device.c_str(), config.substr(config.rfind('/') + 1).c_str(), static_cast<long long>(ctx),
          gb, out_ms[0], in_ms[0], gb / out_ms[0] * 1e3, gb / in_ms[0] * 1e3,
          (out_ms[0] + in_ms[0]) / ms, out_ms[1], in_ms[1], gb / out_ms[1] * 1e3,
          gb / in_ms[1] * 1e3);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_batch: %s\n", e.what());
    return 1;
  }
}
