// The CUDA backend's decode fast path (engine/cuda/gemv.h, the fused rotary embedding and cache
// write, the decode step recorded as a CUDA graph) against the operators it replaces. Without a
// GPU (CI) every test skips and says why.
//
// Tolerances:
//  * GEMV (16-bit weights, one token): the same products as the CPU's matmul (f32 x times the
//    weight widened to f32, exact in f32), summed in another order in f32: K * 2^-24 per term
//    of sum|x w|, tested at 4 K 2^-24 sum|x w| (+ the bias and the residual's own rounding).
//    SiLU adds the GPU's expf (2 ulp).
//  * The fused rotary embedding computes the same f32 expressions as the separate kernel:
//    equal bits.
//  * A recorded (graph) step runs the same kernels as a launched one; only the decode attention
//    may cut the keys into another number of splits (the graph keeps the most splits any
//    position can use), which reorders the softmax sums (~1e-6 relative). The next layer's K and
//    V go to a bf16 cache, where such a difference can flip a rounding (2^-8 relative), so the
//    logits are compared within 2^-8 of their largest magnitude: a wrong position or a stale
//    block table moves them by far more.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "tests/backend_test_util.h"
#include "tests/fixture_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/attention_params.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/gemv.h"
#endif

namespace needle {
namespace {

#ifdef NEEDLE_HAVE_CUDA
using test::Download;
using test::Upload;
// A random [rows, cols] weight of type t on the host and (through PrepareWeights) the GPU.
struct HostDev {
  test::OwnedWeight owned;
  Weight host, dev;
};
HostDev MakeWeight(Backend& gpu, DType t, int64_t rows, int64_t cols, uint64_t seed) {
  HostDev h{test::MakeWeight(t, rows, cols, seed), {}, {}};
  h.host = h.owned.w;
  h.dev = test::DeviceWeight(gpu, h.host);
  return h;
}
// sum_k |x_k w_nk| for every row n of w.
std::vector<double> Magnitudes(const std::vector<float>& x, const Weight& w) {
  std::vector<double> m(static_cast<size_t>(w.rows));
  for (int64_t n = 0; n < w.rows; ++n)
    for (int64_t k = 0; k < w.cols; ++k)
      m[n] += std::fabs(x[k] * LoadAsF32(w.dtype, w.data, static_cast<size_t>(n * w.cols + k)));
  return m;
}
// Rows of the first output: 301 (a block's second row missing), and two counts for this GPU's
// tensor-core GEMV choices (gemv_tc.cu), their last blocks partly filled: a q/k/v-sized one,
// whose blocks of 16 rows overflow one wave of two a multiprocessor by half a wave (the narrow
// products), and a gate/up-sized one, whose 3-m-tile blocks fill three such waves (GateUp; its
// 4-m-tile blocks with NEEDLE_GEMV_TC_MT3=0: scripts/device_cuda_check.sh tests runs these tests
// again with it).
std::vector<int64_t> FirstRows() {
  int dev = 0, sm = 0;
  NEEDLE_CUDA_CHECK(cudaGetDevice(&dev));
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
  return {301, 16 * (5 * sm / 2) - 3, 24 * 6 * sm - 5};
}
// Whether a case runs with r0 rows: the large counts only where the tensor-core kernel takes the
// product (bf16 weights, its batch kernels), at one K.
bool RunsWithRows(int64_t r0, DType t, int64_t K, bool batch_kernels) {
  return r0 == 301 || (t == DType::kBF16 && K == 264 && batch_kernels);
}
void ExpectRowsClose(const std::vector<float>& got, const std::vector<float>& want,
                     const std::vector<double>& mag, double rel, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], rel * mag[i] + 1e-6 * (1 + std::fabs(want[i])))
        << what << " at " << i;
}
#endif

// Which table entries the TMA decode attention reads only after its dependent launch's wait
// (pdl.cuh): none of a table shared by every head (written by copies before the step's
// kernels), every entry of a table per KV head unless the view names the keys the kernel
// before writes (the device plan's Context entries). Host code: runs without a GPU.
TEST(CudaDecode, TableEntriesReadAfterTheWait) {
#ifdef NEEDLE_HAVE_CUDA
  KVLayerView v{};
  v.block_size = 128;
  AttnArgs a{};
  a.T = 1, a.pos0 = 9000, a.heads = 28, a.kv_heads = 4, a.head_dim = 128;
  cuda::AttnParams p = cuda::MakeAttnParams(nullptr, v, a, nullptr, nullptr);
  EXPECT_GE(p.table_late_lo, p.table_late_hi);  // shared table: nothing late
  v.table_head_stride = 70;
  p = cuda::MakeAttnParams(nullptr, v, a, nullptr, nullptr);
  EXPECT_EQ(p.table_late_lo, 0);  // per head, nothing said: every key late
  EXPECT_GT(p.table_late_hi, a.pos0);
  v.table_step_lo = 128, v.table_step_hi = 128 + 32 * 128;
  p = cuda::MakeAttnParams(nullptr, v, a, nullptr, nullptr);
  EXPECT_EQ(p.table_late_lo, 128);
  EXPECT_EQ(p.table_late_hi, 128 + 32 * 128);
#else
  GTEST_SKIP() << "built without CUDA";
#endif
}

// Project (q/k/v in one launch), ProjectAdd and GateUp on one token against the CPU's operators,
// for bf16 and f16 weights with biases, odd row counts (a block's second row missing) and K a
// multiple of 8, with and without the RMSNorm of the input folded in (its weights bf16 or f32);
// K = 260 (not a multiple of 8) and f32 weights take cuBLAS.
TEST(CudaDecode, FusedProjectionsMatchCpu) {
  NEEDLE_REQUIRE_GPU(gpu);
#ifdef NEEDLE_HAVE_CUDA
  ThreadingContext tc(2);
  auto cpu = MakeCpuBackend(tc, true);
  for (bool batch_kernels : {false, true})  // the tensor-core GEMV for bf16 when true
    for (DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
      gpu->PreferBatchKernels(batch_kernels);
      for (int64_t K : {264, 1032, 260})
        for (int64_t r0 : FirstRows())
          for (int normed = 0; normed < 3; ++normed) {  // none, bf16 norm weights, f32 norm weights
            if (!RunsWithRows(r0, t, K, batch_kernels)) continue;
            const std::string what = std::string(DTypeName(t)) + " K=" + std::to_string(K) +
                                     " rows=" + std::to_string(r0) +
                                     " norm=" + std::to_string(normed);
            const bool gemv = t != DType::kF32 && K % 8 == 0;
            // cuBLAS rounds x to 16 bits: 2^-8 of sum|x w| (test_cuda.cc); the GEMV keeps f32.
            const double rel =
                gemv ? 4.0 * K / (1 << 24) : (t == DType::kF32 ? 4.0 * K / (1 << 24) : 1.0 / 256);
            const std::vector<float> x = test::RandomVector(static_cast<size_t>(K), 7);
            BackendBuffer xd = Upload(*gpu, x);
            HostDev g = MakeWeight(*gpu, normed == 2 ? DType::kF32 : DType::kBF16, 1, K, 60);
            std::vector<float> xn(static_cast<size_t>(K));  // the CPU's normalised x
            BackendBuffer xnd(*gpu, static_cast<size_t>(K));
            const Backend::InputNorm nc{normed ? &g.host : nullptr, 1e-5f, xn.data()};
            const Backend::InputNorm ng{normed ? &g.dev : nullptr, 1e-5f, xnd.get()};
            if (normed) cpu->RmsNorm(x.data(), 1, K, g.host, 1e-5f, xn.data());
            const std::vector<float>& xm = normed ? xn : x;  // what the products read
            // Project: three outputs of r0, 63 and 64 rows.
            const int64_t rows[3] = {r0, 63, 64};
            std::vector<HostDev> w, b;
            for (int i = 0; i < 3; ++i) {
              w.push_back(MakeWeight(*gpu, t, rows[i], K, 20 + i));
              b.push_back(MakeWeight(*gpu, t, 1, rows[i], 30 + i));
            }
            std::vector<std::vector<float>> want(3);
            std::vector<BackendBuffer> yd;
            Backend::Projection pc[3], pg[3];
            for (int i = 0; i < 3; ++i) {
              want[i].resize(static_cast<size_t>(rows[i]));
              yd.emplace_back(*gpu, static_cast<size_t>(rows[i]));
              pc[i] = {&w[i].host, &b[i].host, want[i].data()};
              pg[i] = {&w[i].dev, &b[i].dev, yd[i].get()};
            }
            cpu->Project(x.data(), 1, nc, pc, 3);
            gpu->Project(xd.get(), 1, ng, pg, 3);
            for (int i = 0; i < 3; ++i)
              ExpectRowsClose(Download(*gpu, yd[i].get(), want[i].size()), want[i],
                              Magnitudes(xm, w[i].host), rel,
                              what + " project " + std::to_string(i));

            if (!normed) {  // ProjectAdd takes no norm
              // ProjectAdd: y (a residual) += x W^T + b.
              const std::vector<float> y0 = test::RandomVector(r0, 41);
              std::vector<float> ya = y0, scratch(r0);
              BackendBuffer yad = Upload(*gpu, y0), sd(*gpu, r0);
              cpu->ProjectAdd(x.data(), 1, w[0].host, &b[0].host, ya.data(), scratch.data());
              gpu->ProjectAdd(xd.get(), 1, w[0].dev, &b[0].dev, yad.get(), sd.get());
              ExpectRowsClose(Download(*gpu, yad.get(), r0), ya, Magnitudes(x, w[0].host), rel,
                              what + " project+add");
            }

            // GateUp: silu(gate) * up, r0 rows each.
            HostDev wu = MakeWeight(*gpu, t, r0, K, 50), bu = MakeWeight(*gpu, t, 1, r0, 51);
            std::vector<float> gt(r0), us(r0);
            BackendBuffer gd(*gpu, r0), ud(*gpu, r0);
            cpu->GateUp(x.data(), 1, nc, w[0].host, &b[0].host, wu.host, &bu.host, gt.data(),
                        us.data());
            gpu->GateUp(xd.get(), 1, ng, w[0].dev, &b[0].dev, wu.dev, &bu.dev, gd.get(), ud.get());
            // d(silu(a) u) = silu'(a) u da + silu(a) du, |silu'| <= 1.1, |silu(a)| <= |a| + 0.3.
            const std::vector<double> mg = Magnitudes(xm, w[0].host), mu = Magnitudes(xm, wu.host);
            std::vector<double> mag(r0);
            for (size_t i = 0; i < mag.size(); ++i)
              mag[i] = 1.1 * mg[i] * (mu[i] + 1.0) + (mg[i] + 1.3) * mu[i];
            ExpectRowsClose(Download(*gpu, gd.get(), r0), gt, mag, 2 * rel, what + " gate/up");
          }
    }
#endif
}

// A call of T tokens (a batch of sequences' decode rows) gives every token the bits it gets in a
// call alone (Project with three outputs, ProjectAdd, GateUp; with and without the folded norm;
// bf16 and f16; T across the kernel's groups of 1, 2, 4 and 8 tokens, to kGemvMaxTokens). This
// is what makes a batch's greedy answers those of each sequence alone on the GPU.
TEST(CudaDecode, TokensOfOneCallEqualEachAlone) {
  NEEDLE_REQUIRE_GPU(gpu);
#ifdef NEEDLE_HAVE_CUDA
  for (bool batch_kernels : {false, true})  // the CUDA-core GEMV, the tensor-core one
    for (DType t : {DType::kBF16, DType::kF16}) {
      gpu->PreferBatchKernels(batch_kernels);
      for (int64_t K : {264, 1032}) {
        for (int64_t r0 : FirstRows())
          for (int normed = 0; normed < 2; ++normed) {
            // (The large counts: the tensor-core kernel's choices to 8 and to 16 tokens.)
            if (!RunsWithRows(r0, t, K, batch_kernels)) continue;
            const std::vector<int64_t> Ts = r0 == 301
                                                ? std::vector<int64_t>{2, 3, 4, 5, 8, 9, 17, 64}
                                                : std::vector<int64_t>{3, 9, 16};
            for (int64_t T : Ts) {
              const std::string what =
                  std::string(DTypeName(t)) + " K=" + std::to_string(K) +
                  " rows=" + std::to_string(r0) + " norm=" + std::to_string(normed) +
                  " T=" + std::to_string(T) + (batch_kernels ? " (batch kernels)" : "");
              const size_t TK = static_cast<size_t>(T * K);
              const std::vector<float> x = test::RandomVector(TK, 7 + static_cast<int>(T));
              BackendBuffer xd = Upload(*gpu, x), xnd(*gpu, TK);
              HostDev g = MakeWeight(*gpu, DType::kBF16, 1, K, 60);
              const Backend::InputNorm ng{normed ? &g.dev : nullptr, 1e-5f, xnd.get()};
              const int64_t rows[3] = {r0, 63, 64};
              std::vector<HostDev> w, b;
              for (int i = 0; i < 3; ++i) {
                w.push_back(MakeWeight(*gpu, t, rows[i], K, 20 + i));
                b.push_back(MakeWeight(*gpu, t, 1, rows[i], 30 + i));
              }
              HostDev wu = MakeWeight(*gpu, t, r0, K, 50), bu = MakeWeight(*gpu, t, 1, r0, 51);
              const std::vector<float> y0 = test::RandomVector(static_cast<size_t>(T * r0), 41);
              // All T at once.
              std::vector<BackendBuffer> yd;
              Backend::Projection pg[3];
              for (int i = 0; i < 3; ++i) {
                yd.emplace_back(*gpu, static_cast<size_t>(T * rows[i]));
                pg[i] = {&w[i].dev, &b[i].dev, yd[i].get()};
              }
              gpu->Project(xd.get(), T, ng, pg, 3);
              BackendBuffer yad = Upload(*gpu, y0), sd(*gpu, static_cast<size_t>(T * r0));
              gpu->ProjectAdd(xd.get(), T, w[0].dev, &b[0].dev, yad.get(), sd.get());
              BackendBuffer gd(*gpu, static_cast<size_t>(T * r0)),
                  ud(*gpu, static_cast<size_t>(T * r0));
              gpu->GateUp(xd.get(), T, ng, w[0].dev, &b[0].dev, wu.dev, &bu.dev, gd.get(),
                          ud.get());
              std::vector<std::vector<float>> all(3);
              for (int i = 0; i < 3; ++i)
                all[i] = Download(*gpu, yd[i].get(), static_cast<size_t>(T * rows[i]));
              const std::vector<float> add_all =
                  Download(*gpu, yad.get(), static_cast<size_t>(T * r0));
              const std::vector<float> gate_all =
                  Download(*gpu, gd.get(), static_cast<size_t>(T * r0));
              // Each token alone.
              for (int64_t m = 0; m < T; ++m) {
                const std::vector<float> xm(x.begin() + m * K, x.begin() + (m + 1) * K);
                BackendBuffer x1 = Upload(*gpu, xm), xn1(*gpu, static_cast<size_t>(K));
                const Backend::InputNorm n1{normed ? &g.dev : nullptr, 1e-5f, xn1.get()};
                std::vector<BackendBuffer> y1;
                Backend::Projection p1[3];
                for (int i = 0; i < 3; ++i) {
                  y1.emplace_back(*gpu, static_cast<size_t>(rows[i]));
                  p1[i] = {&w[i].dev, &b[i].dev, y1[i].get()};
                }
                gpu->Project(x1.get(), 1, n1, p1, 3);
                for (int i = 0; i < 3; ++i) {
                  const std::vector<float> one =
                      Download(*gpu, y1[i].get(), static_cast<size_t>(rows[i]));
                  for (int64_t r = 0; r < rows[i]; ++r)
                    ASSERT_EQ(all[i][m * rows[i] + r], one[r])
                        << what << " project " << i << " token " << m << " row " << r;
                }
                const std::vector<float> ym(y0.begin() + m * r0, y0.begin() + (m + 1) * r0);
                BackendBuffer ya1 = Upload(*gpu, ym), s1(*gpu, r0);
                gpu->ProjectAdd(x1.get(), 1, w[0].dev, &b[0].dev, ya1.get(), s1.get());
                const std::vector<float> add1 = Download(*gpu, ya1.get(), r0);
                BackendBuffer g1(*gpu, r0), u1(*gpu, r0);
                gpu->GateUp(x1.get(), 1, n1, w[0].dev, &b[0].dev, wu.dev, &bu.dev, g1.get(),
                            u1.get());
                const std::vector<float> gate1 = Download(*gpu, g1.get(), r0);
                for (int64_t r = 0; r < r0; ++r) {
                  ASSERT_EQ(add_all[m * r0 + r], add1[r])
                      << what << " add token " << m << " row " << r;
                  ASSERT_EQ(gate_all[m * r0 + r], gate1[r])
                      << what << " gate/up token " << m << " row " << r;
                }
              }
            }
          }
      }
    }
#endif
}

// The fused rotary embedding + cache write leaves q, k and the cache exactly as Rope, Rope,
// KVWrite do, for one token and for a short prompt, across a block boundary.
TEST(CudaDecode, RopeKVWriteEqualsSeparateOps) {
  NEEDLE_REQUIRE_GPU(gpu);
#ifdef NEEDLE_HAVE_CUDA
  const int64_t H = 7, Hk = 1, D = 64, B = 16;
  std::vector<float> inv_freq(D / 2);
  for (int64_t i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(10000.f, -2.f * i / D);
  for (int64_t T : {1, 5}) {
    const int64_t pos0 = 13;
    const auto q = test::RandomVector(static_cast<size_t>(T * H * D), 1);
    const auto k = test::RandomVector(static_cast<size_t>(T * Hk * D), 2);
    const auto v = test::RandomVector(static_cast<size_t>(T * Hk * D), 3);
    std::vector<std::vector<float>> qs, ks, caches;
    for (bool fused : {false, true}) {
      SetCudaFused(*gpu, fused);
      KVCache cache(KVCacheShape{2, Hk, D, 64, B, DType::kF32}, 0, gpu->kv_memory());
      BackendBuffer qd = Upload(*gpu, q), kd = Upload(*gpu, k), vd = Upload(*gpu, v);
      gpu->RopeKVWrite(qd.get(), kd.get(), vd.get(), T, H, cache, 1, pos0, inv_freq, 0.9f);
      qs.push_back(Download(*gpu, qd.get(), q.size()));
      ks.push_back(Download(*gpu, kd.get(), k.size()));
      // Both arenas of layer 1, every slot (the blocks were assigned in the same order).
      const KVLayerView view = cache.Layer(1);
      const size_t n = static_cast<size_t>(view.slots * Hk * B * D);
      std::vector<float> arena(2 * n);
      NEEDLE_CUDA_CHECK(cudaMemcpy(arena.data(), view.k, n * 4, cudaMemcpyDeviceToHost));
      NEEDLE_CUDA_CHECK(cudaMemcpy(arena.data() + n, view.v, n * 4, cudaMemcpyDeviceToHost));
      caches.push_back(arena);
    }
    SetCudaFused(*gpu, true);
    EXPECT_EQ(qs[0], qs[1]) << "T=" << T;
    EXPECT_EQ(ks[0], ks[1]) << "T=" << T;
    EXPECT_EQ(caches[0], caches[1]) << "T=" << T;
  }
#endif
}

// The q/k/v projection with the rotary embedding and the cache write folded in (one launch)
// leaves q, k, v and the cache exactly as the projection followed by RopeKVWrite does: each row
// is summed in the same order, and rotated by the same expressions. bf16 and f32 caches.
TEST(CudaDecode, ProjectRopeKVWriteEqualsTwoSteps) {
  NEEDLE_REQUIRE_GPU(gpu);
#ifdef NEEDLE_HAVE_CUDA
  const int64_t H = 7, Hk = 1, D = 64, K = 264, B = 16, pos0 = 21;
  std::vector<float> inv_freq(D / 2);
  for (int64_t i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(10000.f, -2.f * i / D);
  const int64_t rows[3] = {H * D, Hk * D, Hk * D};
  std::vector<HostDev> w, b;
  for (int i = 0; i < 3; ++i) {
    w.push_back(MakeWeight(*gpu, DType::kBF16, rows[i], K, 70 + i));
    b.push_back(MakeWeight(*gpu, DType::kBF16, 1, rows[i], 80 + i));
  }
  HostDev g = MakeWeight(*gpu, DType::kBF16, 1, K, 90);
  const auto x = test::RandomVector(static_cast<size_t>(K), 91);
  for (DType kv : {DType::kBF16, DType::kF32}) {
    std::vector<std::vector<float>> got;
    for (bool fused : {false, true}) {
      KVCache cache(KVCacheShape{1, Hk, D, 64, B, kv}, 0, gpu->kv_memory());
      {  // (zeroed: the arenas are compared whole, and fresh device memory may hold anything,
         // NaNs included, which never compare equal)
        const size_t bytes = static_cast<size_t>(cache.Layer(0).slots) * cache.BlockBytes();
        NEEDLE_CUDA_CHECK(cudaMemset(cache.BlockData(0, false, 0), 0, bytes));
        NEEDLE_CUDA_CHECK(cudaMemset(cache.BlockData(0, true, 0), 0, bytes));
      }
      BackendBuffer xd = Upload(*gpu, x), scratch(*gpu, static_cast<size_t>(K));
      std::vector<BackendBuffer> y;
      Backend::Projection p[3];
      for (int i = 0; i < 3; ++i) {
        y.emplace_back(*gpu, static_cast<size_t>(rows[i]));
        p[i] = {&w[i].dev, &b[i].dev, y[i].get()};
      }
      const Backend::InputNorm norm{&g.dev, 1e-6f, scratch.get()};
      if (fused) {
        setenv("NEEDLE_CUDA_ROPE_FOLD", "1", 1);  // opt-in (cuda_backend.cu)
        gpu->ProjectRopeKVWrite(xd.get(), 1, norm, p, H, cache, 0, pos0, inv_freq, 1.f);
        unsetenv("NEEDLE_CUDA_ROPE_FOLD");
      } else {
        gpu->Project(xd.get(), 1, norm, p, 3);
        gpu->RopeKVWrite(y[0].get(), y[1].get(), y[2].get(), 1, H, cache, 0, pos0, inv_freq, 1.f);
      }
      std::vector<float> all;
      for (int i = 0; i < 3; ++i) {
        const auto h = Download(*gpu, y[i].get(), static_cast<size_t>(rows[i]));
        all.insert(all.end(), h.begin(), h.end());
      }
      // The token's K and V rows in the cache, widened to f32 for the comparison.
      const KVLayerView view = cache.Layer(0);
      const size_t n = static_cast<size_t>(view.slots * Hk * B * D), es = DTypeSize(kv);
      std::vector<uint8_t> arena(2 * n * es);
      NEEDLE_CUDA_CHECK(cudaMemcpy(arena.data(), view.k, n * es, cudaMemcpyDeviceToHost));
      NEEDLE_CUDA_CHECK(cudaMemcpy(arena.data() + n * es, view.v, n * es, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < 2 * n; ++i) all.push_back(LoadAsF32(kv, arena.data(), i));
      got.push_back(std::move(all));
    }
    ASSERT_EQ(got[0].size(), got[1].size());
    for (size_t i = 0; i < got[0].size(); ++i)
      ASSERT_EQ(got[0][i], got[1][i]) << DTypeName(kv) << " at " << i << " (q " << rows[0] << ", k "
                                      << rows[1] << ", v " << rows[2] << " rows, then "
                                      << "the K and V arenas)";
  }
#endif
}

// Decode steps replayed from the recorded CUDA graph give the logits of steps launched one by
// one, on every 16-bit fixture (sliding window, dynamic rope, q/k norm, GQA 7), over 300 steps
// (past two cache blocks and the sliding window, so that the graph is replayed at positions
// whose blocks were assigned after it was recorded); and the graph is in fact replayed.
class CudaRecorded : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaRecorded, ReplayedStepsMatchLaunchedSteps) {
  NEEDLE_REQUIRE_GPU(gpu);
#ifdef NEEDLE_HAVE_CUDA
  const std::string dir = test::FixturesDir() + "/" + GetParam();
  auto model = LoadModel(dir, *gpu);
  const int64_t steps = 300, V = model->config().vocab_size;
  const std::vector<int32_t> prompt = {1, 17, 42, 99, 3};
  std::vector<std::vector<float>> runs;
  for (const char* graph : {"0", "1"}) {
    setenv("NEEDLE_CUDA_GRAPH", graph, 1);
    const CudaRecordStats before = GetCudaRecordStats(*gpu);
    KVCache cache(model->CacheShape(512, DType::kBF16), 0, gpu->kv_memory());
    std::vector<float> logits, all;
    model->Forward(prompt.data(), static_cast<int64_t>(prompt.size()), cache, false, &logits);
    for (int64_t s = 0; s < steps; ++s) {
      const int32_t tok = static_cast<int32_t>((s * 37 + 11) % V);  // the same input both runs
      model->Forward(&tok, 1, cache, false, &logits);
      all.insert(all.end(), logits.begin(), logits.end());
    }
    const CudaRecordStats after = GetCudaRecordStats(*gpu);
    if (graph[0] == '1') {
      EXPECT_EQ(after.recordings - before.recordings, 1) << GetParam();
      EXPECT_EQ(after.replays - before.replays, steps - 1) << GetParam();
    } else {
      EXPECT_EQ(after.replays, before.replays) << GetParam();
    }
    runs.push_back(std::move(all));
  }
  unsetenv("NEEDLE_CUDA_GRAPH");
  double scale = 0;
  for (float x : runs[0]) scale = std::max(scale, std::fabs(static_cast<double>(x)));
  ASSERT_EQ(runs[0].size(), runs[1].size());
  for (size_t i = 0; i < runs[0].size(); ++i)
    ASSERT_NEAR(runs[1][i], runs[0][i], scale / 256)
        << GetParam() << " step " << i / V << " logit " << i % V;
#endif
}

std::vector<std::string> SixteenBitFixtures() {
  std::vector<std::string> out;
  for (const std::string& n : test::FixtureNames())
    if (n.find("_f32") == std::string::npos) out.push_back(n);
  return out;
}
INSTANTIATE_TEST_SUITE_P(All, CudaRecorded, ::testing::ValuesIn(SixteenBitFixtures()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace needle
