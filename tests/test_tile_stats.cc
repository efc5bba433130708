// cuda::AttentionTileStats: the TMA decode kernel's softmax sums of each 32-key tile of a key
// range (device placement's retention reads them instead of a second pass over the selected
// blocks), against sums computed on the host in double from the keys as the cache stores them.
// Without a GPU (CI) the test skips and says why.
//
// Tolerances: the kernel carries q and p as hi + lo 16-bit pairs (tests/test_cuda.cc,
// DecodeSplitsMatchCpu): a score moves by up to 2^-18 sum_d |q_d k_d| scale, below 2e-4 here
// (|q| <= 4, |k| <= 1, D <= 128), and the lse by 2e-4. A tile's mass l exp(m - lse) is then within
// about 4e-4 of its relative value; compared at 1e-3 relative plus 1e-7 absolute (a tile moved by
// one position, a head or a key left out changes it by far more). The attention's own output and
// lse are the same bits with and without the sums: they do not change its arithmetic.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "tests/backend_test_util.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/attention.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#endif

namespace needle {
namespace {

#ifdef NEEDLE_HAVE_CUDA
using test::Download;
using test::Upload;

TEST(CudaTileStats, TileSumsMatchHost) {
  NEEDLE_REQUIRE_GPU(gpu);
  int major = 0;
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  if (major < 9) GTEST_SKIP() << "the TMA decode kernel needs compute capability 9.0";
  struct Case {
    int64_t kv_heads, group, D, block, n, key0, key_end;
    DType kv;
  };
  const Case cases[] = {
      {4, 7, 128, 128, 40 * 128, 128, 128 + 32 * 128, DType::kBF16},  // Qwen2.5-7B's heads
      {8, 4, 128, 64, 9000, 64, 64 + 20 * 64, DType::kBF16},          // packed (G <= 4)
      {2, 1, 64, 64, 3001, 0, 3 * 64, DType::kF16},                   // G = 1, from key 0
      {2, 8, 64, 32, 4000, 32 * 7, 32 * 90, DType::kBF16},            // G = 8, one tile a block
      {3, 3, 128, 128, 20000, 128 * 2, 128 * 150, DType::kF16},       // odd group, many splits
  };
  cudaStream_t stream = CudaBackendStream(*gpu);
  cuda::AttnWorkspace ws;
  int sm = 0;
  NEEDLE_CUDA_CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0));
  for (const Case& c : cases) {
    const int64_t heads = c.kv_heads * c.group, G = c.group, D = c.D;
    const std::string what = "Hk " + std::to_string(c.kv_heads) + " G " + std::to_string(G) +
                             " D " + std::to_string(D) + " block " + std::to_string(c.block) +
                             " keys " + std::to_string(c.n);
    KVCacheShape shape{1, c.kv_heads, D, c.n, c.block, c.kv};
    KVCache gc(shape, 0, gpu->kv_memory());
    auto k = test::RandomVector(static_cast<size_t>(c.n * c.kv_heads * D), 21 + c.n);
    auto v = test::RandomVector(static_cast<size_t>(c.n * c.kv_heads * D), 22 + c.n);
    auto q = test::RandomVector(static_cast<size_t>(heads * D), 23 + c.n);
    for (float& x : q) x *= 4.f;
    BackendBuffer kd = Upload(*gpu, k), vd = Upload(*gpu, v), qd = Upload(*gpu, q);
    gpu->KVWrite(gc, 0, 0, c.n, kd.get(), vd.get());
    gc.SetSize(c.n);
    AttnArgs a;
    a.T = 1, a.pos0 = c.n - 1, a.heads = heads, a.kv_heads = c.kv_heads, a.head_dim = D;
    a.scale = 1.0f / std::sqrt(static_cast<float>(D));
    const int64_t tiles = (c.key_end - c.key0) / 32;
    BackendBuffer od(*gpu, q.size()), lsed(*gpu, static_cast<size_t>(heads)), od2(*gpu, q.size()),
        lsed2(*gpu, static_cast<size_t>(heads)),
        std(*gpu, static_cast<size_t>(c.kv_heads * tiles * G * 2));
    ASSERT_TRUE(cuda::AttentionTileStats(qd.get(), gc.Layer(0), a, od.get(), lsed.get(), sm, ws,
                                         stream, c.key0, c.key_end, std.get()))
        << what;
    cuda::Attention(qd.get(), gc.Layer(0), a, od2.get(), lsed2.get(), sm, ws, stream);
    NEEDLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> out = Download(*gpu, od), lse = Download(*gpu, lsed),
                             out2 = Download(*gpu, od2), lse2 = Download(*gpu, lsed2),
                             st = Download(*gpu, std);
    ASSERT_EQ(out, out2) << what << ": the sums changed the attention's output";
    ASSERT_EQ(lse, lse2) << what << ": the sums changed the attention's lse";
    // The keys as stored (rounded to the cache's type), from the device arena.
    const KVLayerView view = gc.Layer(0);
    const size_t es = DTypeSize(c.kv),
                 arena = static_cast<size_t>(view.slots * c.kv_heads * c.block * D);
    std::vector<uint8_t> karena(arena * es);
    NEEDLE_CUDA_CHECK(cudaMemcpy(karena.data(), view.k, karena.size(), cudaMemcpyDeviceToHost));
    for (int64_t h = 0; h < c.kv_heads; ++h)
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row = h * G + g;
          double want = 0;
          for (int64_t key = c.key0 + 32 * t; key < c.key0 + 32 * (t + 1); ++key) {
            const int64_t slot = gc.SlotOf(0, key / c.block);
            const size_t at =
                static_cast<size_t>(((slot * c.kv_heads + h) * c.block + key % c.block) * D);
            double s = 0;
            for (int64_t d = 0; d < D; ++d)
              s += static_cast<double>(q[row * D + d]) * LoadAsF32(c.kv, karena.data(), at + d);
            want += std::exp(s * a.scale - lse[row]);
          }
          const float* x = st.data() + ((h * tiles + t) * G + g) * 2;
          const double got = x[1] * std::exp(static_cast<double>(x[0]) - lse[row]);
          ASSERT_NEAR(got, want, 1e-3 * want + 1e-7)
              << what << ": KV head " << h << " tile " << t << " head " << g;
        }
  }
}
#endif

}  // namespace
}  // namespace needle
