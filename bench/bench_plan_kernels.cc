// The GPU kernels of a decode step planned on the GPU (--kv-placement device,
// engine/cuda/hybrid_device_plan.cc), each alone on warm caches, timed with CUDA events over
// many calls, against the bytes it reads and the GPU's measured copy bandwidth. One JSON object
// per kernel and context on stdout:
//   {"bench":"plan_kernels", "kernel", "context", "us" (per call), "bytes" (read), "GB/s",
//    "of_hbm" (GB/s over the device-to-device copy bandwidth measured first)}
// Usage: bench_plan_kernels KV_HEADS GROUP HEAD_DIM CONTEXTS  e.g. 4 7 128 8192,1048576
// (Quest representatives in bf16, 128-token blocks, topk 32, retain 8: the defaults.)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/base/error.h"
#include "engine/cuda/block_select.h"
#include "engine/cuda/context_gather.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/device_plan.h"
#include "engine/cuda/kernels.h"

namespace needle {
namespace {

// Microseconds per call of f, over `reps` calls after 3 warm-up calls.
template <typename F>
double Time(cudaStream_t s, int reps, F&& f) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  NEEDLE_CUDA_CHECK(cudaEventCreate(&a));
  NEEDLE_CUDA_CHECK(cudaEventCreate(&b));
  NEEDLE_CUDA_CHECK(cudaEventRecord(a, s));
  for (int i = 0; i < reps; ++i) f();
  NEEDLE_CUDA_CHECK(cudaEventRecord(b, s));
  NEEDLE_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  NEEDLE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return 1e3 * ms / reps;
}

template <typename T>
T* Dev(size_t n) {
  void* p = nullptr;
  NEEDLE_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

void Run(int64_t Hk, int64_t G, int64_t D, int64_t ctx, double hbm) {
  const int64_t B = 128, n = ctx / B - 1 - 32, topk = 32, R = 8, want = topk + R, Rr = 2;
  cudaStream_t s;
  NEEDLE_CUDA_CHECK(cudaStreamCreate(&s));
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  // Representatives [n][Hk][2][D] bf16 (random bits of plausible values), the query.
  std::vector<uint16_t> rh(static_cast<size_t>(n * Hk * Rr * D));
  for (auto& x : rh) {
    const float f = nd(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    x = static_cast<uint16_t>(u >> 16);
  }
  auto* reps = Dev<uint16_t>(rh.size());
  NEEDLE_CUDA_CHECK(cudaMemcpy(reps, rh.data(), rh.size() * 2, cudaMemcpyHostToDevice));
  std::vector<float> qh(static_cast<size_t>(Hk * G * D));
  for (auto& x : qh) x = nd(rng);
  float* q = Dev<float>(qh.size());
  NEEDLE_CUDA_CHECK(cudaMemcpy(q, qh.data(), qh.size() * 4, cudaMemcpyHostToDevice));
  float *qa = Dev<float>(Hk * D), *qb = Dev<float>(Hk * D), *sc = Dev<float>(Hk * n);
  float* vals = Dev<float>(Hk * want);
  auto* ids = Dev<int32_t>(Hk * want);
  // A ring of 64 blocks (K, V) and its table, the extra slots, retention.
  const int64_t slots = 64, hb = B * D * 2;
  auto* k = Dev<uint8_t>(slots * Hk * hb);
  auto* v = Dev<uint8_t>(slots * Hk * hb);
  auto* xk = Dev<uint8_t>(topk * Hk * hb);
  auto* xv = Dev<uint8_t>(topk * Hk * hb);
  NEEDLE_CUDA_CHECK(cudaMemset(k, 0x3c, slots * Hk * hb));
  std::vector<int32_t> th(static_cast<size_t>(n + 64));
  for (size_t i = 0; i < th.size(); ++i) th[i] = static_cast<int32_t>(i % slots);
  auto* table = Dev<int32_t>(th.size());
  NEEDLE_CUDA_CHECK(cudaMemcpy(table, th.data(), th.size() * 4, cudaMemcpyHostToDevice));
  auto* ret = Dev<int32_t>(Hk * (R + 1));
  NEEDLE_CUDA_CHECK(cudaMemset(ret, 0xff, Hk * (R + 1) * 4));  // counts -1: none
  auto *sel = Dev<int32_t>(Hk * topk), *kept = Dev<int32_t>(Hk * R), *kc = Dev<int32_t>(Hk);
  auto *src = Dev<int32_t>(Hk * topk), *dst = Dev<int32_t>(Hk * topk);
  auto* view = Dev<int32_t>(Hk * (topk + 2));  // per-head view tables: 1 + topk + 1 entries
  {  // the gather's lists: head h of block j of the ring into extra slot j
    std::vector<int32_t> sh(static_cast<size_t>(Hk * topk)), dh(sh.size());
    for (int64_t h = 0; h < Hk; ++h)
      for (int64_t j = 0; j < topk; ++j)
        sh[h * topk + j] = static_cast<int32_t>((j % slots) * Hk + h),
                      dh[h * topk + j] = static_cast<int32_t>(j * Hk + h);
    NEEDLE_CUDA_CHECK(cudaMemcpy(src, sh.data(), sh.size() * 4, cudaMemcpyHostToDevice));
    NEEDLE_CUDA_CHECK(cudaMemcpy(dst, dh.data(), dh.size() * 4, cudaMemcpyHostToDevice));
  }
  float *stats = Dev<float>(Hk * topk * G * 2), *lse = Dev<float>(Hk * G);
  NEEDLE_CUDA_CHECK(cudaMemset(lse, 0, Hk * G * 4));
  const int reps_n = 200;
  auto line = [&](const char* name, double us, double bytes) {
    const double gbs = bytes / (us * 1e3);
    std::printf(
        "{\"bench\":\"plan_kernels\",\"kernel\":\"%s\",\"context\":%lld,\"kv_heads\":%lld,"
        "\"group\":%lld,\"us\":%.2f,\"bytes\":%.0f,\"GB/s\":%.1f,\"of_hbm\":%.3f}\n",
        name, static_cast<long long>(ctx), static_cast<long long>(Hk), static_cast<long long>(G),
        us, bytes, gbs, gbs / hbm);
  };
  line("group_queries",
       Time(s, reps_n, [&] { cuda::GroupQueries(q, Hk * G, Hk, D, true, qa, qb, s); }),
       static_cast<double>(qh.size() * 4));
  line("score_blocks",
       Time(s, reps_n,
            [&] { cuda::ScoreBlocks(reps, DType::kBF16, Rr, 0, n, Hk, D, qa, qb, sc, s); }),
       static_cast<double>(rh.size() * 2));
  line("top_blocks",
       Time(s, reps_n, [&] { cuda::TopBlocks(sc, Hk, n, false, 1, want, vals, ids, s); }),
       static_cast<double>(Hk * n * 4));
  const auto select = [&] {
    cuda::SelectFromShortlist(vals, ids, want, want, ret, ret + Hk * R, R, 1, n + 1, topk, Hk,
                              false, table, topk, sel, kept, kc, view, topk + 2, 1, s);
  };
  line("select", Time(s, reps_n, select), static_cast<double>(Hk * want * 8));
  // The fused launches against the pairs they replace, back to back as a step queues them.
  line("group_queries+score_blocks",
       Time(s, reps_n,
            [&] {
              cuda::GroupQueries(q, Hk * G, Hk, D, true, qa, qb, s);
              cuda::ScoreBlocks(reps, DType::kBF16, Rr, 0, n, Hk, D, qa, qb, sc, s);
            }),
       static_cast<double>(rh.size() * 2));
  line("score_from_query",
       Time(s, reps_n,
            [&] {
              cuda::ScoreBlocksFromQuery(reps, DType::kBF16, Rr, 0, n, Hk, G, D, q, true, qa, qb,
                                         sc, s);
            }),
       static_cast<double>(rh.size() * 2));
  {  // As in a step: each call scores another layer's representatives, not in L2 (256 MiB of
     // copies, at least 2), as the 28 layers' 448 MB at 1M are not.
    const size_t one = rh.size() * 2;
    const size_t copies = std::max<size_t>(2, (size_t{256} << 20) / one);
    auto* ring = Dev<uint8_t>(copies * one);
    for (size_t i = 0; i < copies; ++i)
      NEEDLE_CUDA_CHECK(cudaMemcpy(ring + i * one, reps, one, cudaMemcpyDeviceToDevice));
    size_t at = 0;
    line("score_from_query_cold",
         Time(s, reps_n,
              [&] {
                cuda::ScoreBlocksFromQuery(ring + (at++ % copies) * one, DType::kBF16, Rr, 0, n, Hk,
                                           G, D, q, true, qa, qb, sc, s);
              }),
         static_cast<double>(one));
    cudaDeviceSynchronize();
    cudaFree(ring);
  }
  const cuda::SelectArgs sa =
      cuda::MakeSelectArgs(want, want, ret, ret + Hk * R, R, 1, n + 1, topk, Hk, false, table, topk,
                           sel, kept, kc, view, topk + 2, 1);
  line("top_blocks+select",
       Time(s, reps_n,
            [&] {
              cuda::TopBlocks(sc, Hk, n, false, 1, want, vals, ids, s);
              select();
            }),
       static_cast<double>(Hk * n * 4));
  line("top_blocks_select",
       Time(s, reps_n,
            [&] {
              if (!cuda::TopBlocksSelect(sc, Hk, n, false, 1, want, vals, ids, sa, nullptr, s))
                Fail("bench_plan_kernels: TopBlocksSelect did not apply");
            }),
       static_cast<double>(Hk * n * 4));
  // (The gather's sources: blocks of the 64-slot ring, as the hybrid copies its share.)
  line("gather",
       Time(s, reps_n,
            [&] {
              cuda::GatherBlocks(k, v, src, dst, Hk * topk, static_cast<size_t>(hb), xk, xv, s);
            }),
       static_cast<double>(2 * Hk * topk * hb));
  line("block_stats",
       Time(s, reps_n,
            [&] { cuda::BlockStats(q, xk, DType::kBF16, topk, Hk, G, B, D, 0.088f, stats, s); }),
       static_cast<double>(Hk * topk * hb));
  line("retain",
       Time(s, reps_n,
            [&] {
              cuda::RetainByMass(sel, topk, stats, 1, lse, Hk, G, false, R, ret, ret + Hk * R, s);
            }),
       static_cast<double>(Hk * topk * G * 8));
  cudaDeviceSynchronize();
  for (void* p :
       std::initializer_list<void*>{reps,  q,   qa,  qb,   sc, vals, ids, k,    v,     xk, xv,
                                    table, ret, sel, kept, kc, src,  dst, view, stats, lse})
    cudaFree(p);
  cudaStreamDestroy(s);
}

}  // namespace
}  // namespace needle

int main(int argc, char** argv) {
  using namespace needle;
  try {
    if (argc < 5) Fail("usage: bench_plan_kernels KV_HEADS GROUP HEAD_DIM CONTEXTS");
    const int64_t Hk = std::stoll(argv[1]), G = std::stoll(argv[2]), D = std::stoll(argv[3]);
    // The GPU's copy bandwidth (device to device, 1 GiB: read + write counted).
    const size_t bytes = size_t{1} << 30;
    void *a = nullptr, *b = nullptr;
    NEEDLE_CUDA_CHECK(cudaMalloc(&a, bytes));
    NEEDLE_CUDA_CHECK(cudaMalloc(&b, bytes));
    const double us =
        Time(nullptr, 10, [&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice); });
    const double hbm = 2.0 * static_cast<double>(bytes) / (us * 1e3);
    cudaFree(a);
    cudaFree(b);
    std::printf("{\"bench\":\"plan_kernels\",\"copy_GB/s\":%.0f}\n", hbm);
    std::stringstream ss(argv[4]);
    for (std::string x; std::getline(ss, x, ',');) Run(Hk, G, D, std::stoll(x), hbm);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_plan_kernels: %s\n", e.what());
    return 1;
  }
}
