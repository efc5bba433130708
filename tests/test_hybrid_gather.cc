// The GPU's share of the hybrid engine's Context blocks (SparseConfig::gpu_share): the gather of
// blocks from page-locked host memory, and their softmax sums (BlockStats) against the CPU's
// AttendBlocks. The ring's extra slots are tested beside the ring (test_hybrid.cc); the fixtures
// there run the whole engine with shares 0, 25, 50 and 100.
//
// Tolerances: the gather is a copy (bytes equal). BlockStats and AttendBlocks compute the same
// f32 dot products of the same key values in another order: 2^-24 relative per term over
// head_dim terms of magnitude up to |q||k|, about 1e-6 of a score; a block's log-sum-exp
// m + log(l) is compared within 1e-5 of its magnitude (a key left out or read from the wrong
// block moves it by far more).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/cpu/amx.h"
#include "engine/cpu/ops.h"
#include "kvcache/kv_cache.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/context_gather.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/pinned_host.h"
#endif

namespace needle {
namespace {

#ifdef NEEDLE_HAVE_CUDA
// Blocks gathered from a page-locked host cache equal the host's bytes, and their softmax sums
// on the GPU equal AttendBlocks' for the same blocks.
TEST(HybridGather, GatherAndBlockStatsEqualHost) {
  NEEDLE_REQUIRE_GPU(gpu);
  if (!cuda::HostPointersUsableOnGpu()) GTEST_SKIP() << "host pointers not usable on this GPU";
  amx::SetMode(amx::Mode::kOff);  // the Highway fold: f32 products of the stored values
  ThreadingContext tc(2);
  cudaStream_t stream = CudaBackendStream(*gpu);
  for (DType kvt : {DType::kF32, DType::kBF16}) {
    for (int64_t G : {1, 7}) {
      const int64_t Hk = 3, D = 64, B = 16, n_tok = 40 * B;
      KVCache cache(KVCacheShape(1, Hk, D, n_tok, B, kvt));
      const std::vector<float> k = test::RandomVector(n_tok * Hk * D, 11, 2.f),
                               v = test::RandomVector(n_tok * Hk * D, 12);
      cache.Write(0, 0, n_tok, k.data(), v.data());
      cache.SetSize(n_tok);
      const size_t bb = cache.BlockBytes(), hb = bb / static_cast<size_t>(Hk);
      const size_t arena = bb * static_cast<size_t>(cache.shape().TotalSlots());
      cuda::ArenaPinning pk, pv;
      pk.Reset(cache.BlockData(0, false, 0), arena);
      pv.Reset(cache.BlockData(0, true, 0), arena);
      ASSERT_TRUE(pk.Pin(cache.BlockData(0, false, 0), arena));
      ASSERT_TRUE(pv.Pin(cache.BlockData(0, true, 0), arena));
      // Head h attends blocks[h]; the gather lays them out [j][h] as the hybrid's extra slots.
      const std::vector<std::vector<int32_t>> blocks = {
          {3, 9, 17, 38}, {0, 1, 2, 30}, {39, 5, 7, 8}};
      const int64_t n = 4;
      std::vector<int32_t> src;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < Hk; ++h)
          src.push_back(cache.SlotOf(0, blocks[h][j]) * static_cast<int32_t>(Hk) +
                        static_cast<int32_t>(h));
      const size_t bytes = hb * static_cast<size_t>(n * Hk);
      float* d = gpu->Alloc(2 * bytes / 4 + static_cast<size_t>(Hk * G * D + Hk * n * G * 2));
      auto* dk = reinterpret_cast<uint8_t*>(d);
      cuda::PinnedFloats src_pin;  // (the kernel reads the list from pinned memory)
      auto* src_p = reinterpret_cast<int32_t*>(src_pin.Get(src.size()));
      std::copy(src.begin(), src.end(), src_p);
      NEEDLE_CUDA_CHECK(cudaMemsetAsync(dk, 0, 2 * bytes, stream));
      cuda::GatherBlocks(cache.BlockData(0, false, 0), cache.BlockData(0, true, 0), src_p, n * Hk,
                         hb, dk, dk + bytes, stream);
      std::vector<uint8_t> got(2 * bytes);
      gpu->ToHost(d, 2 * bytes / 4, reinterpret_cast<float*>(got.data()));
      for (int64_t i = 0; i < n * Hk; ++i)
        for (int kv = 0; kv < 2; ++kv) {
          const uint8_t* want = cache.BlockData(0, kv == 1, 0) + static_cast<size_t>(src[i]) * hb;
          ASSERT_EQ(std::memcmp(got.data() + static_cast<size_t>(kv) * bytes + i * hb, want, hb), 0)
              << "item " << i << (kv == 1 ? " V" : " K");
        }
      // Softmax sums.
      AttnArgs a;
      a.T = 1, a.pos0 = n_tok - 1, a.heads = Hk * G, a.kv_heads = Hk, a.head_dim = D;
      a.scale = 0.125f;
      const std::vector<float> q = test::RandomVector(a.heads * D, 13, 2.f);
      float* dq = d + 2 * bytes / 4;
      float* dst = dq + Hk * G * D;
      gpu->FromHost(q.data(), q.size(), dq);
      cuda::BlockStats(dq, dk, kvt, n, Hk, G, B, D, a.scale, dst, stream);
      std::vector<float> st(static_cast<size_t>(Hk * n * G * 2));
      gpu->ToHost(dst, st.size(), st.data());
      gpu->Free(d);
      std::vector<float> out(static_cast<size_t>(a.heads * D)), lse(static_cast<size_t>(a.heads)),
          want;
      // The CPU's sums of each block alone (AttendBlocks' m is a running maximum: compared
      // through the block's own log-sum-exp m + log(l)).
      for (int64_t h = 0; h < Hk; ++h) {
        for (int64_t j = 0; j < n; ++j) {
          std::vector<std::vector<int32_t>> single(static_cast<size_t>(Hk));
          single[h] = {blocks[h][j]};
          fast::AttendBlocks(q.data(), cache.Layer(0), a, single, out.data(), lse.data(), &want,
                             tc);
          for (int64_t g = 0; g < G; ++g) {
            const float* gs = st.data() + ((h * n + j) * G + g) * 2;
            const double got_lse = gs[0] + std::log(static_cast<double>(gs[1]));
            const double want_lse = want[2 * g] + std::log(static_cast<double>(want[2 * g + 1]));
            ASSERT_NEAR(got_lse, want_lse, 1e-5 * (1 + std::fabs(want_lse)))
                << KVTypeName(kvt) << " G " << G << " head " << h << " block " << blocks[h][j];
          }
        }
      }
    }
  }
  amx::SetMode(amx::Mode::kFromEnv);
}
#endif

}  // namespace
}  // namespace needle
