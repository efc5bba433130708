// The CUDA backend against the CPU backend (random inputs) and against the transformers fixtures.
// Without a GPU (CI) every test skips and says why; tests/README.md has the command that runs
// them on the GPU machine.
//
// Tolerances:
//  * element-wise ops: a few f32 ulps of the result (the GPU's expf/rsqrtf differ from the CPU's
//    by <= 2 ulp; RMSNorm sums squares in another order: D * 2^-24 relative).
//  * matmul, f32 weights: K * 2^-24 * sum|x w| per output (any summation order), as for the CPU.
//    bf16 weights: the GPU rounds x to bf16 before the product (the CPU keeps x in f32), so each
//    term carries up to 2^-8 relative error: bound K * 2^-8 * max|x w|, tested at 2^-8 * sum|x w|.
//  * attention: scores carry the dot bound; the GPU's __expf adds ~2^-21 relative per weight.
//    With |q|, |k|, |v| <= 1 and D <= 128 we allow 2e-5 * max|v| + 1e-6.
//    Prompts (T >= 64) over bf16/f16 caches take the tensor-core kernel (attention_tc.h), which
//    rounds q and the probabilities to the cache's type (2^-8 relative for bf16, 2^-11 for f16):
//    there we allow 2^-6 (bf16) and 2^-9 (f16) of the largest output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/model/generate.h"
#include "tests/backend_test_util.h"
#include "tests/fixture_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

namespace needle {
namespace {

// The CUDA backend, or nullptr after GTEST_SKIP's message is set by the caller.
std::unique_ptr<Backend> CudaOrSkipReason(std::string* why) {
#ifdef NEEDLE_HAVE_CUDA
  if (!CudaAvailable(why)) return nullptr;
  return MakeCudaBackend(0);
#else
  *why = "this build has no CUDA (nvcc was not found at configure time)";
  return nullptr;
#endif
}

#define NEEDLE_REQUIRE_GPU(var)       \
  std::string why_;                   \
  auto var = CudaOrSkipReason(&why_); \
  if (var == nullptr) GTEST_SKIP() << "no GPU: " << why_;

using test::DeviceWeight;
using test::Download;
using test::MakeWeight;
using test::OwnedWeight;
using test::Upload;

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, double rel,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (float w : want) scale = std::max(scale, std::fabs(static_cast<double>(w)));
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], rel * scale + 1e-7) << what << " at " << i;
}

TEST(Cuda, ElementwiseOpsMatchCpu) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, true);
  for (int64_t D : {67, 128, 4096}) {
    const int64_t rows = 5;
    auto x = test::RandomVector(static_cast<size_t>(rows * D), 1 + D);
    OwnedWeight w = MakeWeight(DType::kBF16, 1, D, 7);
    const Weight wd = DeviceWeight(*gpu, w.w);
    std::vector<float> want(x.size());
    cpu->RmsNorm(x.data(), rows, D, w.w, 1e-6f, want.data());
    BackendBuffer xd = Upload(*gpu, x);
    gpu->RmsNorm(xd.get(), rows, D, wd, 1e-6f, xd.get());
    ExpectClose(Download(*gpu, xd), want, 8e-7 + D * 6e-8, "RmsNorm D=" + std::to_string(D));
  }
  {
    const int64_t T = 3, H = 8, D = 128;
    std::vector<float> inv(D / 2);
    for (int64_t i = 0; i < D / 2; ++i) inv[i] = std::pow(500000.0f, -2.0f * i / D);
    auto x = test::RandomVector(static_cast<size_t>(T * H * D), 3);
    std::vector<float> want = x;
    cpu->Rope(want.data(), T, H, D, 131071, inv, 1.2f);
    BackendBuffer xd = Upload(*gpu, x);
    gpu->Rope(xd.get(), T, H, D, 131071, inv, 1.2f);
    ExpectClose(Download(*gpu, xd), want, 1e-6, "Rope");
  }
  {
    const int64_t n = 100003;
    auto g = test::RandomVector(n, 4, 6.0f), u = test::RandomVector(n, 5);
    std::vector<float> want(n);
    cpu->SiluMul(g.data(), u.data(), n, want.data());
    BackendBuffer gd = Upload(*gpu, g), ud = Upload(*gpu, u);
    gpu->SiluMul(gd.get(), ud.get(), n, gd.get());
    ExpectClose(Download(*gpu, gd), want, 1e-6, "SiluMul");
    cpu->Add(g.data(), u.data(), n);
    BackendBuffer g2 = Upload(*gpu, test::RandomVector(n, 4, 6.0f));
    gpu->Add(g2.get(), ud.get(), n);
    ExpectClose(Download(*gpu, g2), g, 1e-7, "Add");
  }
  {
    OwnedWeight table = MakeWeight(DType::kF16, 50, 33, 9);
    const Weight td = DeviceWeight(*gpu, table.w);
    const std::vector<int32_t> ids = {0, 49, 7, 7};
    std::vector<float> want(ids.size() * 33);
    cpu->Embed(table.w, ids.data(), 4, want.data());
    BackendBuffer out(*gpu, want.size());
    gpu->Embed(td, ids.data(), 4, out.get());
    ExpectClose(Download(*gpu, out), want, 0, "Embed");
  }
}

TEST(Cuda, MatMulMatchesCpu) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, true);
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t T : {1, 7, 300}) {
      const int64_t N = 301, K = 257;
      OwnedWeight w = MakeWeight(t, N, K, 11);
      OwnedWeight bias = MakeWeight(t, 1, N, 12);
      const Weight wd = DeviceWeight(*gpu, w.w), bd = DeviceWeight(*gpu, bias.w);
      auto x = test::RandomVector(static_cast<size_t>(T * K), 13);
      std::vector<float> want(static_cast<size_t>(T * N));
      cpu->MatMul(x.data(), T, w.w, &bias.w, want.data());
      BackendBuffer xd = Upload(*gpu, x), yd(*gpu, want.size());
      gpu->MatMul(xd.get(), T, wd, &bd, yd.get());
      const std::vector<float> got = Download(*gpu, yd);
      // Per output: bound * sum_k |x_k w_k| (see the header).
      const double rel = t == DType::kF32 ? 2.0 * K / (1 << 24) : 1.0 / 256;
      for (int64_t r = 0; r < T; ++r)
        for (int64_t n = 0; n < N; ++n) {
          double mag = 0;
          for (int64_t k = 0; k < K; ++k)
            mag += std::fabs(x[r * K + k] * LoadAsF32(t, w.w.data, static_cast<size_t>(n * K + k)));
          ASSERT_NEAR(got[r * N + n], want[r * N + n], rel * mag + 1e-6)
              << DTypeName(t) << " T=" << T << " at " << r << "," << n;
        }
    }
  }
}

// Top-k selection (greedy = k 1) on the GPU equals the CPU's, ties (lower id first) included.
TEST(Cuda, TopKMatchesCpu) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(1);
  auto cpu = MakeCpuBackend(tc, false);
  for (int64_t V : {1, 50, 4096, 151936}) {
    std::vector<float> l = test::RandomVector(static_cast<size_t>(V), 900 + V, 10.0f);
    for (auto& x : l) x = std::round(x);  // many ties
    BackendBuffer ld = Upload(*gpu, l);
    for (int64_t k : {1, 7, 64}) {
      const int64_t kk = std::min(k, V);
      std::vector<float> cv(kk), gv(kk);
      std::vector<int32_t> ci(kk), gi(kk);
      cpu->TopK(l.data(), V, kk, cv.data(), ci.data());
      gpu->TopK(ld.get(), V, kk, gv.data(), gi.data());
      EXPECT_EQ(gi, ci) << "V=" << V << " k=" << kk;
      EXPECT_EQ(gv, cv) << "V=" << V << " k=" << kk;
    }
  }
}

// Dense causal attention through KVWrite + Attention on both backends: prefill of n tokens, then
// one decode step, for GQA 1/4/7/8, head_dim 64/128, odd lengths and every float KV type.
TEST(Cuda, AttentionMatchesCpu) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(4);
  auto cpu = MakeCpuBackend(tc, false);
  struct Case {
    int64_t kv_heads, group, D, n;
    DType kv;
    int64_t window;
    int64_t chunk = 0;  // prefill in chunks of this many tokens, each checked (0: one call)
  };
  std::vector<Case> cases;
  for (int64_t g : {1, 4, 7, 8})
    for (int64_t D : {64, 128})
      for (int64_t n : {1, 37, 1000}) cases.push_back({2, g, D, n, DType::kF32, 0});
  cases.push_back({8, 4, 128, 4099, DType::kBF16, 0});
  cases.push_back({8, 4, 128, 4099, DType::kF16, 0});
  cases.push_back({2, 4, 64, 999, DType::kF32, 100});     // sliding window
  cases.push_back({8, 4, 128, 131072, DType::kBF16, 0});  // 128K decode
  // The tensor-core prefill kernel: GQA 1/7/8, head_dim 64, window, lengths not multiples of 64.
  cases.push_back({2, 1, 64, 130, DType::kBF16, 0});
  cases.push_back({2, 7, 64, 1000, DType::kBF16, 0});
  cases.push_back({2, 8, 128, 777, DType::kF16, 0});
  cases.push_back({2, 4, 64, 999, DType::kBF16, 100});
  cases.push_back({2, 4, 128, 3000, DType::kBF16, 1000});
  // Chunked prefill: queries start at positions that are not multiples of the kernels' tiles.
  cases.push_back({2, 4, 128, 1000, DType::kBF16, 0, 333});
  cases.push_back({2, 8, 64, 700, DType::kF16, 200, 250});
  // The 16-bit prefill cases run once per tensor-core kernel: the default (wgmma on Hopper) and
  // mma.sync (NEEDLE_CUDA_ATTN_TC=mma); the f32 cases once.
  std::vector<std::pair<Case, const char*>> runs;
  for (const Case& c : cases) {
    runs.push_back({c, ""});
    if (c.kv != DType::kF32) runs.push_back({c, "mma"});
  }
  for (const auto& [c, variant] : runs) {
    setenv("NEEDLE_CUDA_ATTN_TC", variant, 1);
    const int64_t heads = c.kv_heads * c.group;
    const bool long_ctx = c.n > 8192;  // prefill the long case in chunks on both sides
    KVCacheShape shape{1, c.kv_heads, c.D, c.n + 1, 64, c.kv};
    KVCache cc(shape), gc(shape, 0, gpu->kv_memory());
    AttnArgs a;
    a.heads = heads;
    a.kv_heads = c.kv_heads;
    a.head_dim = c.D;
    a.window = c.window;
    a.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
    std::vector<float> want, got;
    for (int64_t pos = 0; pos <= c.n;) {
      const int64_t step = long_ctx ? 8192 : c.chunk > 0 ? c.chunk : c.n;
      const int64_t T = pos < c.n ? std::min<int64_t>(c.n - pos, step) : 1;
      a.T = T;
      a.pos0 = pos;
      auto q = test::RandomVector(static_cast<size_t>(T * heads * c.D), 100 + pos);
      auto k = test::RandomVector(static_cast<size_t>(T * c.kv_heads * c.D), 200 + pos);
      auto v = test::RandomVector(static_cast<size_t>(T * c.kv_heads * c.D), 300 + pos);
      cpu->KVWrite(cc, 0, pos, T, k.data(), v.data());
      BackendBuffer kd = Upload(*gpu, k), vd = Upload(*gpu, v), qd = Upload(*gpu, q);
      gpu->KVWrite(gc, 0, pos, T, kd.get(), vd.get());
      cc.SetSize(pos + T);
      gc.SetSize(pos + T);
      const bool check = !long_ctx || pos == c.n;  // the long case: the decode step only
      if (check) {
        want.assign(q.size(), 0);
        cpu->Attention(q.data(), cc.Layer(0), a, nullptr, want.data(), nullptr);
        BackendBuffer od(*gpu, q.size());
        gpu->Attention(qd.get(), gc.Layer(0), a, nullptr, od.get(), nullptr);
        got = Download(*gpu, od);
        const bool tc = T >= 64 && c.kv != DType::kF32;  // the tensor-core kernel
        // T == 1 over a 16-bit cache: the TMA decode kernel on compute capability >= 9.0, whose
        // hi + lo split of q and p moves a score by up to 2^-18 sum |q k| scale (<= 4.2e-5 with
        // |q|, |k| <= 1, D = 128; see DecodeSplitsMatchCpu).
        const bool decode16 = T == 1 && c.kv != DType::kF32;
        const double tol = tc         ? (c.kv == DType::kBF16 ? 1.0 / 64 : 1.0 / 512)
                           : decode16 ? 1e-4
                                      : 2e-5;
        ExpectClose(got, want, tol,
                    "attention G=" + std::to_string(c.group) + " D=" + std::to_string(c.D) +
                        " n=" + std::to_string(c.n) + " " + KVTypeName(c.kv) +
                        (pos == c.n ? " decode" : " prefill at " + std::to_string(pos)) +
                        (*variant != 0 ? std::string(" ") + variant : std::string()));
      }
      pos += T;
    }
  }
  unsetenv("NEEDLE_CUDA_ATTN_TC");
}

// The largest |got - want| over the largest |want|.
double RelErr(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 0, err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
    err = std::max(err, std::fabs(static_cast<double>(got[i]) - want[i]));
  }
  return scale > 0 ? err / scale : err;
}

// The decode kernels' key splits and the merge done by the last block of each KV head: out and
// lse against the CPU, from one split to the cap (256, one KV head), with a sliding window, and
// each call made twice (the arrival counters must be back at zero for the second). Each case
// runs with the default kernel (the TMA one on compute capability >= 9.0) and with the register
// kernel (NEEDLE_CUDA_ATTN_DECODE=simt).
// Tolerances: the register kernel keeps q and p in f32 (2e-5, as AttentionMatchesCpu). The TMA
// kernel carries q and p as hi + lo 16-bit pairs: |x - (hi + lo)| <= 2^-18 |x| for bf16, so a
// score moves by up to 2^-18 sum_d |q_d k_d| scale (<= 45 * 2^-18 = 1.7e-4 here, with |q| <= 4,
// |k| <= 1, D = 128) and each weight by that relative amount: 2e-4 of the largest output, and
// 2e-4 absolute on lse.
TEST(Cuda, DecodeSplitsMatchCpu) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(4);
  auto cpu = MakeCpuBackend(tc, false);
  struct Case {
    int64_t kv_heads, group, D, n, window;
    DType kv;
    int64_t block = 64;
  };
  const Case cases[] = {
      {8, 4, 128, 63, 0, DType::kBF16},        // one split
      {8, 4, 128, 20, 0, DType::kBF16},        // one partial tile: fewer tiles than warps
      {8, 4, 128, 5000, 0, DType::kBF16},      // a few per KV head
      {1, 8, 128, 40000, 0, DType::kF16},      // the cap: 256 splits of one KV head
      {2, 1, 64, 3001, 0, DType::kBF16},       // G = 1, head_dim 64
      {4, 7, 64, 9000, 2000, DType::kBF16},    // G = 7, the window's keys split
      {2, 8, 64, 777, 100, DType::kF16},       // a window inside one split, f16, G = 8
      {16, 1, 64, 40000, 0, DType::kBF16},     // > 32 tiles per warp (block-table batches)
      {2, 4, 128, 1000, 0, DType::kBF16, 16},  // block_size 16: the register kernel only
  };
  for (const char* variant : {"", "simt"}) {
    setenv("NEEDLE_CUDA_ATTN_DECODE", variant, 1);
    for (const Case& c : cases) {
      const int64_t heads = c.kv_heads * c.group;
      KVCacheShape shape{1, c.kv_heads, c.D, c.n, c.block, c.kv};
      KVCache cc(shape), gc(shape, 0, gpu->kv_memory());
      auto k = test::RandomVector(static_cast<size_t>(c.n * c.kv_heads * c.D), 11 + c.n);
      auto v = test::RandomVector(static_cast<size_t>(c.n * c.kv_heads * c.D), 12 + c.n);
      auto q = test::RandomVector(static_cast<size_t>(heads * c.D), 13 + c.n);
      for (float& x : q) x *= 4.f;  // sharper softmax: the splits' maxima differ
      cpu->KVWrite(cc, 0, 0, c.n, k.data(), v.data());
      BackendBuffer kd = Upload(*gpu, k), vd = Upload(*gpu, v), qd = Upload(*gpu, q);
      gpu->KVWrite(gc, 0, 0, c.n, kd.get(), vd.get());
      cc.SetSize(c.n);
      gc.SetSize(c.n);
      AttnArgs a;
      a.T = 1;
      a.pos0 = c.n - 1;
      a.heads = heads;
      a.kv_heads = c.kv_heads;
      a.head_dim = c.D;
      a.window = c.window;
      a.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
      std::vector<float> want(q.size()), want_lse(static_cast<size_t>(heads));
      cpu->Attention(q.data(), cc.Layer(0), a, nullptr, want.data(), want_lse.data());
      const std::string what = "decode G=" + std::to_string(c.group) + " D=" + std::to_string(c.D) +
                               " n=" + std::to_string(c.n) + " window=" + std::to_string(c.window) +
                               " block=" + std::to_string(c.block) +
                               " kernel=" + (*variant != 0 ? variant : "default");
      const bool f32_kernel = *variant != 0;
      const double tol = f32_kernel ? 2e-5 : 2e-4;
      for (int rep = 0; rep < 2; ++rep) {
        BackendBuffer od(*gpu, q.size()), lsed(*gpu, static_cast<size_t>(heads));
        gpu->Attention(qd.get(), gc.Layer(0), a, nullptr, od.get(), lsed.get());
        const std::vector<float> got = Download(*gpu, od), lse = Download(*gpu, lsed);
        double lse_err = 0;
        for (int64_t h = 0; h < heads; ++h)
          lse_err = std::max(lse_err, static_cast<double>(std::fabs(lse[h] - want_lse[h])));
        if (rep == 0)
          std::printf("[ cuda     ] %s: max error %.2e of the largest output, lse %.2e\n",
                      what.c_str(), RelErr(got, want), lse_err);
        ExpectClose(got, want, tol, what + " call " + std::to_string(rep));
        for (int64_t h = 0; h < heads; ++h)
          ASSERT_NEAR(lse[h], want_lse[h],
                      (f32_kernel ? 1e-4 : 2e-4) * std::max(1.f, std::fabs(want_lse[h])))
              << what << " lse of head " << h << " call " << rep;
      }
    }
  }
  unsetenv("NEEDLE_CUDA_ATTN_DECODE");
}

// A one-layer cache on the CPU and its twin on the GPU, every token written with the same random
// K (seed) and V (seed + 1).
struct TwinCaches {
  TwinCaches(Backend& cpu_b, Backend& gpu_b, const KVCacheShape& s, uint64_t seed)
      : cpu(s),
        gpu(s, 0, gpu_b.kv_memory()),
        k(test::RandomVector(static_cast<size_t>(s.capacity * s.kv_heads * s.head_dim), seed)),
        v(test::RandomVector(k.size(), seed + 1)),
        kd(Upload(gpu_b, k)),
        vd(Upload(gpu_b, v)) {
    const int64_t n = s.capacity;
    cpu_b.KVWrite(cpu, 0, 0, n, k.data(), v.data());
    gpu_b.KVWrite(gpu, 0, 0, n, kd.get(), vd.get());
    cpu.SetSize(n);
    gpu.SetSize(n);
  }
  KVCache cpu, gpu;
  std::vector<float> k, v;
  BackendBuffer kd, vd;  // (the GPU's copies, alive as long as the caches)
};

// A block table per KV head (KVLayerView::table_head_stride; the device plan reads each head's
// selected blocks where they lie in the ring): head h's blocks, m of the cache's nb, are
// (7 h + 5 j) mod nb for j < m, a different set for every head (nb prime).
std::vector<int32_t> PerHeadTable(const KVCache& cache, int64_t Hk, int64_t nb, int64_t m) {
  std::vector<int32_t> t(static_cast<size_t>(Hk * m));
  for (int64_t h = 0; h < Hk; ++h)
    for (int64_t j = 0; j < m; ++j) t[h * m + j] = cache.SlotOf(0, (7 * h + 5 * j) % nb);
  return t;
}

// On the CPU, a call over a view with a table per KV head gives head h's query heads what a
// call over head h's table alone (every head reading it) gives them: the kernels read each head's
// keys through KVLayerView::KRow. (Runs on CI; the GPU's kernels are compared with it below.)
TEST(KVView, PerHeadTablesOnCpu) {
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, false);
  for (DType kv : {DType::kF32, DType::kBF16}) {
    const int64_t Hk = 3, G = 4, D = 64, B = 16, nb = 41, m = 12, n = nb * B;
    KVCache cache(KVCacheShape{1, Hk, D, n, B, kv});
    const auto k = test::RandomVector(static_cast<size_t>(n * Hk * D), 21),
               v = test::RandomVector(k.size(), 22);
    cpu->KVWrite(cache, 0, 0, n, k.data(), v.data());
    cache.SetSize(n);
    const std::vector<int32_t> table = PerHeadTable(cache, Hk, nb, m);
    for (int64_t T : {1, 5}) {
      AttnArgs a;
      a.T = T, a.pos0 = m * B - T, a.heads = Hk * G, a.kv_heads = Hk, a.head_dim = D;
      a.scale = 0.125f;
      const auto q = test::RandomVector(static_cast<size_t>(T * Hk * G * D), 23 + T);
      KVLayerView view = cache.Layer(0);
      view.table = table.data(), view.table_head_stride = m, view.n_tokens = m * B;
      std::vector<float> got(q.size()), lse(static_cast<size_t>(T * Hk * G));
      cpu->Attention(q.data(), view, a, nullptr, got.data(), lse.data());
      for (int64_t h = 0; h < Hk; ++h) {
        KVLayerView one = view;
        one.table = table.data() + h * m, one.table_head_stride = 0;
        std::vector<float> want(q.size()), want_lse(lse.size());
        cpu->Attention(q.data(), one, a, nullptr, want.data(), want_lse.data());
        for (int64_t t = 0; t < T; ++t)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = t * Hk * G + h * G + g;
            ASSERT_FLOAT_EQ(lse[r], want_lse[r]) << KVTypeName(kv) << " T " << T << " row " << r;
            for (int64_t d = 0; d < D; ++d)
              ASSERT_FLOAT_EQ(got[r * D + d], want[r * D + d])
                  << KVTypeName(kv) << " T " << T << " row " << r << " channel " << d;
          }
      }
    }
  }
}

// The GPU's attention kernels over a view with a table per KV head equal the CPU's over the same
// view: the decode kernels (TMA and register, NEEDLE_CUDA_ATTN_DECODE=simt), the tile kernel
// (f32) and the tensor-core prompt kernels; with AttentionMatchesCpu's tolerances.
TEST(Cuda, PerHeadTablesMatchCpu) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(4);
  auto cpu = MakeCpuBackend(tc, false);
  struct Case {
    int64_t kv_heads, group, D, B, T;
    DType kv;
    const char* decode = "";
  };
  const Case cases[] = {
      {4, 7, 128, 128, 1, DType::kBF16},          // the device plan's shape: the TMA kernel
      {4, 7, 128, 128, 1, DType::kBF16, "simt"},  // the register decode kernel
      {2, 8, 64, 16, 1, DType::kF16},             // block 16: the register kernel only
      {3, 4, 64, 16, 1, DType::kF32},             // f32 decode
      {3, 4, 64, 16, 37, DType::kF32},            // the tile kernel
      {2, 4, 128, 64, 100, DType::kBF16},         // the tensor-core prompt kernel
  };
  for (const Case& c : cases) {
    setenv("NEEDLE_CUDA_ATTN_DECODE", c.decode, 1);
    const int64_t Hk = c.kv_heads, H = Hk * c.group, nb = 41, m = 12, n = nb * c.B;
    TwinCaches tw(*cpu, *gpu, KVCacheShape{1, Hk, c.D, n, c.B, c.kv}, 31);
    KVCache &cc = tw.cpu, &gc = tw.gpu;
    const auto q = test::RandomVector(static_cast<size_t>(c.T * H * c.D), 33);
    BackendBuffer qd = Upload(*gpu, q);
    const std::vector<int32_t> ct = PerHeadTable(cc, Hk, nb, m), gt = PerHeadTable(gc, Hk, nb, m);
    std::vector<float> gt_bits(gt.size());
    std::memcpy(gt_bits.data(), gt.data(), gt.size() * 4);
    BackendBuffer gtd = Upload(*gpu, gt_bits);
    AttnArgs a;
    a.T = c.T, a.pos0 = m * c.B - c.T, a.heads = H, a.kv_heads = Hk, a.head_dim = c.D;
    a.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
    KVLayerView cv = cc.Layer(0), gv = gc.Layer(0);
    cv.table = ct.data(), cv.table_head_stride = m, cv.n_tokens = m * c.B;
    gv.table = reinterpret_cast<const int32_t*>(gtd.get()), gv.table_head_stride = m;
    gv.n_tokens = m * c.B;
    std::vector<float> want(q.size()), want_lse(static_cast<size_t>(c.T * H));
    cpu->Attention(q.data(), cv, a, nullptr, want.data(), want_lse.data());
    BackendBuffer od(*gpu, q.size()), lsed(*gpu, want_lse.size());
    gpu->Attention(qd.get(), gv, a, nullptr, od.get(), c.T == 1 ? lsed.get() : nullptr);
    const std::vector<float> got = Download(*gpu, od);
    const bool tcore = c.T >= 64 && c.kv != DType::kF32, decode16 = c.T == 1 && c.kv != DType::kF32;
    const double tol = tcore ? 1.0 / 64 : decode16 ? 2e-4 : 2e-5;
    const std::string what = std::string("per-head tables ") + KVTypeName(c.kv) +
                             " G=" + std::to_string(c.group) + " B=" + std::to_string(c.B) +
                             " T=" + std::to_string(c.T) + " " + c.decode;
    ExpectClose(got, want, tol, what);
    if (c.T == 1) {
      const std::vector<float> lse = Download(*gpu, lsed);
      for (int64_t r = 0; r < H; ++r)
        ASSERT_NEAR(lse[r], want_lse[r], 2e-4 * std::max(1.f, std::fabs(want_lse[r])))
            << what << " lse of head " << r;
    }
  }
  unsetenv("NEEDLE_CUDA_ATTN_DECODE");
}

// The TMA decode kernel over a per-head table with holes (-1 entries: the device plan of host
// placement leaves the selected blocks the GPU does not hold so, for the CPU) gives what the CPU
// gives over each head's table without them: the holes' keys are masked, not read as zeros. Three
// holes a head, at different places for each head, never the query's block.
TEST(Cuda, TableHolesAreMasked) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(4);
  auto cpu = MakeCpuBackend(tc, false);
  struct Case {
    int64_t kv_heads, group, D, B;
  };
  for (const Case& c : {Case{4, 7, 128, 128}, Case{2, 4, 128, 64}}) {
    const int64_t Hk = c.kv_heads, H = Hk * c.group, nb = 41, m = 12, holes = 3, mc = m - holes;
    const int64_t n = nb * c.B;
    TwinCaches tw(*cpu, *gpu, KVCacheShape{1, Hk, c.D, n, c.B, DType::kBF16}, 41);
    KVCache &cc = tw.cpu, &gc = tw.gpu;
    const auto q = test::RandomVector(static_cast<size_t>(H * c.D), 43);
    BackendBuffer qd = Upload(*gpu, q);
    const std::vector<int32_t> ct = PerHeadTable(cc, Hk, nb, m), gt = PerHeadTable(gc, Hk, nb, m);
    // GPU: head h's entries h + 1, h + 4, h + 7 are holes; CPU: the other entries, in order.
    std::vector<int32_t> holed = gt, kept;
    for (int64_t h = 0; h < Hk; ++h)
      for (int64_t j = 0; j < m; ++j) {
        const bool hole = j < m - 1 && (j == h + 1 || j == h + 4 || j == h + 7);
        if (hole)
          holed[h * m + j] = -1;
        else
          kept.push_back(ct[h * m + j]);
      }
    ASSERT_EQ(static_cast<int64_t>(kept.size()), Hk * mc);
    std::vector<float> bits(holed.size());
    std::memcpy(bits.data(), holed.data(), holed.size() * 4);
    BackendBuffer gtd = Upload(*gpu, bits);
    AttnArgs a;
    a.T = 1, a.heads = H, a.kv_heads = Hk, a.head_dim = c.D;
    a.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
    AttnArgs ac = a;
    a.pos0 = m * c.B - 1, ac.pos0 = mc * c.B - 1;
    KVLayerView cv = cc.Layer(0), gv = gc.Layer(0);
    cv.table = kept.data(), cv.table_head_stride = mc, cv.n_tokens = mc * c.B;
    gv.table = reinterpret_cast<const int32_t*>(gtd.get()), gv.table_head_stride = m;
    gv.n_tokens = m * c.B;
    std::vector<float> want(q.size()), want_lse(static_cast<size_t>(H));
    cpu->Attention(q.data(), cv, ac, nullptr, want.data(), want_lse.data());
    BackendBuffer od(*gpu, q.size()), lsed(*gpu, want_lse.size());
    gpu->Attention(qd.get(), gv, a, nullptr, od.get(), lsed.get());
    const std::string what = "holes G=" + std::to_string(c.group) + " B=" + std::to_string(c.B);
    ExpectClose(Download(*gpu, od), want, 2e-4, what);
    const std::vector<float> lse = Download(*gpu, lsed);
    for (int64_t r = 0; r < H; ++r)
      ASSERT_NEAR(lse[r], want_lse[r], 2e-4 * std::max(1.f, std::fabs(want_lse[r])))
          << what << " lse of head " << r;
  }
}

// Every fixture: logits against transformers within the CPU's tolerances, and greedy tokens
// equal to the CPU's for 32 steps.
class CudaFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaFixture, MatchesTransformersAndCpu) {
  NEEDLE_REQUIRE_GPU(gpu);
  const std::string dir = test::FixturesDir() + "/" + GetParam();
  test::CheckAgainstReference(*gpu, dir, test::LoadReference(dir), GetParam() + " (cuda)",
                              /*rounds_activations=*/true);
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, false);
  auto mc = LoadModel(dir, *cpu);
  auto mg = LoadModel(dir, *gpu);
  const std::vector<int32_t> prompt = {1, 17, 42, 99, 3};
  const DType kv = mc->weights().dtype == DType::kF32 ? DType::kF32 : DType::kBF16;
  KVCache cc(mc->CacheShape(64, kv)), gc(mg->CacheShape(64, kv), 0, gpu->kv_memory());
  const auto a = GenerateGreedy(*mc, cc, prompt, 32, nullptr, nullptr);
  const auto b = GenerateGreedy(*mg, gc, prompt, 32, nullptr, nullptr);
  if (kv == DType::kF32) {
    EXPECT_EQ(a, b);
  }
  size_t same = 0;
  while (same < std::min(a.size(), b.size()) && a[same] == b[same]) ++same;
  std::printf("[ cuda     ] %-30s greedy tokens equal to the CPU's: %zu of %zu\n",
              GetParam().c_str(), same, a.size());
}

INSTANTIATE_TEST_SUITE_P(All, CudaFixture, ::testing::ValuesIn(test::FixtureNames()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace needle
