// The hybrid engine's block selection kernels on the GPU (engine/cuda/block_select.h) against
// the planner's host code: the top-k, the grouped queries and the block scores. GPU only (they
// skip on CI with their reason).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "kvcache/kv_cache.h"
#include "sparse_attn/observation.h"
#include "sparse_attn/representatives.h"
#include "sparse_attn/scoring.h"
#include "tests/gpu_test_util.h"
#include "tests/test_util.h"
#ifdef NEEDLE_HAVE_CUDA
#include "engine/cuda/block_select.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/shortlist.h"
#endif

namespace needle {
namespace {

#ifdef NEEDLE_HAVE_CUDA
// The GPU's block top-k picks exactly the planner's TopK: ties on score broken by the lower block
// id, per head and on scores summed over heads, shortlists longer than the candidates, more
// candidates than threads, and more than the kernel keeps in registers (8195, 20000). Without
// extremes, rows the kernel keeps in registers are settled by the value buckets (top_row.cuh),
// with few candidates (distinct scores) or many (coarse ones: many ties); the extremes (-1e30,
// 3e38) leave every other score in the lowest bucket, so that long rows take the radix passes:
// distinct scores let their search end early (the bin chosen holds exactly the keys still
// wanted), coarse ones take every pass.
TEST(HybridSelect, TopBlocksEqualsPlannerTopK) {
  NEEDLE_REQUIRE_GPU(gpu);
  for (bool distinct : {false, true})
    for (bool extremes : {true, false})
      for (int64_t Hk : {1, 4, 8})
        for (int64_t n : {1, 5, 40, 1000, 8000, 8195, 20000})
          for (int64_t want : {1, 40, 1000})
            for (bool sum : {false, true}) {
              // Coarse or distinct scores of both signs, and a few extremes.
              std::vector<float> sc(static_cast<size_t>(Hk * n));
              uint64_t x = 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(n * 131 + Hk);
              for (auto& v : sc) {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                v = distinct
                        ? static_cast<float>(static_cast<int64_t>(x % 2000001) - 1000000) * 1e-3f
                        : static_cast<float>(static_cast<int64_t>(x % 64) - 32) * 0.25f;
              }
              if (extremes) {
                sc[0] = -1e30f;
                sc[static_cast<size_t>(n - 1)] = 3e38f;
              }
              const int32_t first = 3;
              const int64_t rows = sum ? 1 : Hk, k = std::min(want, n);
              const size_t out = static_cast<size_t>(rows * want);
              float* d = gpu->Alloc(sc.size() + 2 * out);
              gpu->FromHost(sc.data(), sc.size(), d);
              cuda::TopBlocks(d, Hk, n, sum, first, want, d + sc.size(),
                              reinterpret_cast<int32_t*>(d + sc.size() + out),
                              CudaBackendStream(*gpu));
              std::vector<float> got(2 * out);
              gpu->ToHost(d + sc.size(), 2 * out, got.data());
              gpu->Free(d);
              std::vector<int32_t> ids(static_cast<size_t>(n));
              for (int64_t i = 0; i < n; ++i) ids[i] = first + static_cast<int32_t>(i);
              for (int64_t r = 0; r < rows; ++r) {
                std::vector<float> row(sc.begin() + r * n, sc.begin() + (r + 1) * n);
                if (sum) {  // as the planner sums: in head order
                  for (int64_t h = 1; h < Hk; ++h)
                    for (int64_t i = 0; i < n; ++i) row[i] += sc[h * n + i];
                }
                const std::vector<int32_t> expect = TopK(row.data(), ids.data(), n, k);
                std::vector<int32_t> g(static_cast<size_t>(k));
                std::memcpy(g.data(), got.data() + out + r * want, static_cast<size_t>(k) * 4);
                std::vector<int32_t> gs = g;
                std::sort(gs.begin(), gs.end());
                ASSERT_EQ(gs, expect)
                    << "Hk " << Hk << " n " << n << " want " << want << " sum " << sum << " row "
                    << r << " distinct " << distinct << " extremes " << extremes;
                for (int64_t i = 0; i < k; ++i)  // each with its score
                  ASSERT_EQ(got[r * want + i], row[g[i] - first]) << i;
              }
            }
}

// The GPU's combined queries equal the host's GroupQueries bit for bit (same sums, same order),
// so that scores, and so plans, do not depend on where the query was grouped.
TEST(HybridSelect, GroupQueriesEqualsHost) {
  NEEDLE_REQUIRE_GPU(gpu);
  for (auto [heads, Hk, D] :
       {std::tuple<int64_t, int64_t, int64_t>{28, 4, 128}, {32, 8, 128}, {7, 1, 64}, {4, 4, 80}})
    for (bool quest : {false, true}) {
      const std::vector<float> q = test::RandomVector(heads * D, 5);
      std::vector<int32_t> blocks = {0};
      const ScoreArgs a{q.data(), 1, heads, Hk, D, blocks.data(), 1};
      std::vector<float> qa(static_cast<size_t>(Hk * D)), qb(qa.size());
      GroupQueries(a, quest, qa.data(), qb.data());
      float* d = gpu->Alloc(q.size() + 2 * qa.size());
      gpu->FromHost(q.data(), q.size(), d);
      cuda::GroupQueries(d, heads, Hk, D, quest, d + q.size(), d + q.size() + qa.size(),
                         CudaBackendStream(*gpu));
      std::vector<float> got(2 * qa.size());
      gpu->ToHost(d + q.size(), got.size(), got.data());
      gpu->Free(d);
      for (size_t i = 0; i < qa.size(); ++i) {
        ASSERT_EQ(got[i], qa[i]) << heads << "/" << Hk << " quest " << quest << " " << i;
        ASSERT_EQ(got[qa.size() + i], qb[i])
            << heads << "/" << Hk << " quest " << quest << " " << i;
      }
    }
}

// The GPU's block scores (bf16 representatives: 16-byte pieces, several items a warp; f32:
// a warp an item) equal the host's within f32 rounding of sums taken in another order.
TEST(HybridSelect, ScoreBlocksEqualsHost) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(1);
  for (auto [Hk, D] : {std::pair<int64_t, int64_t>{4, 128}, {8, 128}, {2, 64}, {1, 80}})
    for (ReprType rt : {ReprType::kQuest, ReprType::kMax})
      for (DType st : {DType::kBF16, DType::kF32}) {
        const int64_t B = 16, nb = 300;
        KVCache cache(KVCacheShape{1, Hk, D, nb * B, B, st});
        const auto k = test::RandomVector(nb * B * Hk * D, 3), v = test::RandomVector(k.size(), 4);
        cache.Write(0, 0, nb * B, k.data(), v.data());
        cache.SetSize(nb * B);
        RepresentativeStore reps(1, Hk, D, nb, rt, st);
        for (int64_t b = 0; b < nb; ++b) reps.ComputeFromKeys(0, b, cache.Layer(0));
        const std::vector<float> qa = test::RandomVector(Hk * D, 5),
                                 qb = test::RandomVector(Hk * D, 6);
        for (int64_t first : {0, 5})
          for (int64_t n : {int64_t{3}, nb - first}) {
            std::vector<int32_t> ids(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(first + i);
            std::vector<float> want(static_cast<size_t>(Hk * n)), got(want.size());
            fast::ScoreGrouped(reps, 0, ScoreArgs{nullptr, 1, Hk, Hk, D, ids.data(), n}, qa, qb,
                               want.data(), tc);
            const size_t rb = reps.BlockBytes() * static_cast<size_t>(nb);
            float* d = gpu->Alloc(rb / 4 + qa.size() * 2 + want.size());
            NEEDLE_CUDA_CHECK(cudaMemcpy(d, reps.Block(0, 0), rb, cudaMemcpyHostToDevice));
            float* dq = d + rb / 4;
            gpu->FromHost(qa.data(), qa.size(), dq);
            gpu->FromHost(qb.data(), qb.size(), dq + qa.size());
            cuda::ScoreBlocks(d, st, reps.rows(), first, n, Hk, D, dq, dq + qa.size(),
                              dq + 2 * qa.size(), CudaBackendStream(*gpu));
            gpu->ToHost(dq + 2 * qa.size(), got.size(), got.data());
            gpu->Free(d);
            for (size_t i = 0; i < want.size(); ++i)
              ASSERT_NEAR(got[i], want[i], 1e-4 * (1 + std::fabs(want[i])))
                  << Hk << "/" << D << " " << ReprTypeName(rt) << " " << DTypeName(st) << " first "
                  << first << " n " << n << " at " << i;
          }
      }
}
// The fused shortlist (one launch: grouped queries, scores, top-k) against the host: its scores
// equal the planner's (GroupQueries, then the dot products in double) within f32 rounding of
// sums in another order; its shortlist is exactly the planner's TopK of those scores, per head and
// summed over heads; called twice in a row, the same (its arrival counters go back to zero).
// Shapes: Qwen2.5-7B's and Llama-3.1-8B's heads, one KV head, head_dim 64; Quest (two rows) and
// Max (one); candidates from one to more than the grid's first pass covers; coarse values (many
// tied scores) and fine ones. f32 representatives and piece counts that do not divide a warp are
// refused (the caller runs the three kernels).
TEST(HybridSelect, FusedShortlistEqualsPlannerTopKOfItsScores) {
  NEEDLE_REQUIRE_GPU(gpu);
  const cudaStream_t stream = CudaBackendStream(*gpu);
  unsigned* counters = nullptr;
  NEEDLE_CUDA_CHECK(cudaMalloc(&counters, 2 * sizeof(unsigned)));
  NEEDLE_CUDA_CHECK(cudaMemset(counters, 0, 2 * sizeof(unsigned)));
  for (auto [heads, Hk, D] :
       {std::tuple<int64_t, int64_t, int64_t>{28, 4, 128}, {32, 8, 128}, {7, 1, 128}, {8, 2, 64}})
    for (bool quest : {true, false})
      for (bool coarse : {false, true})
        for (int64_t n : {1, 5, 40, 1000, 8000, 8195, 20000}) {
          if (Hk == 8 && n == 20000 && !coarse) continue;  // (the largest once: time)
          const int64_t R = quest ? 2 : 1, first = 7;
          // Representatives of blocks [0, first + n) in bf16 (the top half of an f32), a query.
          std::vector<uint16_t> reps(static_cast<size_t>((first + n) * Hk * R * D));
          uint64_t x = 0x243f6a8885a308d3ull + static_cast<uint64_t>(n * 977 + Hk * 31 + D);
          const auto next = [&] {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            return x;
          };
          for (auto& r : reps) {
            const float f =
                coarse ? static_cast<float>(static_cast<int>(next() % 3) - 1)
                       : static_cast<float>(static_cast<int64_t>(next() % 20001) - 10000) * 1e-4f;
            uint32_t u;
            std::memcpy(&u, &f, 4);
            r = static_cast<uint16_t>(u >> 16);
          }
          std::vector<float> q(static_cast<size_t>(heads * D));
          for (auto& v : q)
            v = coarse ? static_cast<float>(static_cast<int>(next() % 5) - 2)
                       : static_cast<float>(static_cast<int64_t>(next() % 20001) - 10000) * 1e-4f;
          std::vector<int32_t> ids(static_cast<size_t>(n));
          for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(first + i);
          std::vector<float> qa(static_cast<size_t>(Hk * D)), qb(qa.size());
          GroupQueries(ScoreArgs{q.data(), 1, heads, Hk, D, ids.data(), n}, quest, qa.data(),
                       qb.data());
          std::vector<float> expect_sc(static_cast<size_t>(Hk * n));
          for (int64_t i = 0; i < n; ++i)
            for (int64_t h = 0; h < Hk; ++h) {
              const uint16_t* r = reps.data() + ((first + i) * Hk + h) * R * D;
              double s = 0;
              for (int64_t d = 0; d < R * D; ++d) {
                const uint32_t u = static_cast<uint32_t>(r[d]) << 16;
                float f;
                std::memcpy(&f, &u, 4);
                s += static_cast<double>(d < D ? qa[d % D + h * D] : qb[d % D + h * D]) * f;
              }
              expect_sc[h * n + i] = static_cast<float>(s);
            }
          const size_t rep_floats = (reps.size() + 1) / 2;
          float* dev = gpu->Alloc(rep_floats + q.size() + expect_sc.size() + 2 * Hk * 1000);
          NEEDLE_CUDA_CHECK(cudaMemcpy(dev, reps.data(), reps.size() * 2, cudaMemcpyHostToDevice));
          float* dq = dev + rep_floats;
          gpu->FromHost(q.data(), q.size(), dq);
          float *dsc = dq + q.size(), *dvals = dsc + expect_sc.size();
          for (int64_t want : {1, 40, 1000})
            for (bool sum : {false, true}) {
              const int64_t rows = sum ? 1 : Hk, k = std::min(want, n);
              const size_t out = static_cast<size_t>(rows * want);
              auto* dids = reinterpret_cast<int32_t*>(dvals + out);
              std::vector<float> first_got;
              for (int call = 0; call < 2; ++call) {
                ASSERT_TRUE(cuda::FusedShortlist(dq, heads, Hk, D, quest, dev, DType::kBF16, R,
                                                 first, n, sum, want, dsc, dvals, dids, counters,
                                                 stream));
                std::vector<float> sc(expect_sc.size()), got(2 * out);
                gpu->ToHost(dsc, sc.size(), sc.data());
                gpu->ToHost(dvals, got.size(), got.data());
                const std::string at = "heads " + std::to_string(heads) + "/" + std::to_string(Hk) +
                                       " D " + std::to_string(D) + " quest " +
                                       std::to_string(quest) + " coarse " + std::to_string(coarse) +
                                       " n " + std::to_string(n) + " want " + std::to_string(want) +
                                       " sum " + std::to_string(sum) + " call " +
                                       std::to_string(call);
                for (size_t i = 0; i < sc.size(); ++i)
                  ASSERT_NEAR(sc[i], expect_sc[i], 1e-4 * (1 + std::fabs(expect_sc[i])))
                      << at << " score " << i;
                for (int64_t r = 0; r < rows; ++r) {
                  std::vector<float> row(sc.begin() + r * n, sc.begin() + (r + 1) * n);
                  if (sum)  // as the planner sums: in head order
                    for (int64_t h = 1; h < Hk; ++h)
                      for (int64_t i = 0; i < n; ++i) row[i] += sc[h * n + i];
                  const std::vector<int32_t> expect = TopK(row.data(), ids.data(), n, k);
                  std::vector<int32_t> g(static_cast<size_t>(k));
                  std::memcpy(g.data(), got.data() + out + r * want, static_cast<size_t>(k) * 4);
                  for (int64_t i = 0; i < k; ++i)  // each with its score
                    ASSERT_EQ(got[r * want + i], row[g[i] - first]) << at << " row " << r;
                  std::sort(g.begin(), g.end());
                  ASSERT_EQ(g, expect) << at << " row " << r;
                }
                if (call == 0) first_got = got;
                if (call == 1) {  // (the order within a row may differ: compare as sets)
                  for (int64_t r = 0; r < rows; ++r) {
                    std::vector<int32_t> a(static_cast<size_t>(k)), b(a.size());
                    std::memcpy(a.data(), first_got.data() + out + r * want, a.size() * 4);
                    std::memcpy(b.data(), got.data() + out + r * want, b.size() * 4);
                    std::sort(a.begin(), a.end());
                    std::sort(b.begin(), b.end());
                    ASSERT_EQ(a, b) << at;
                  }
                }
              }
            }
          gpu->Free(dev);
        }
  unsigned left[2] = {1, 1};
  NEEDLE_CUDA_CHECK(cudaMemcpy(left, counters, sizeof(left), cudaMemcpyDeviceToHost));
  EXPECT_EQ(left[0], 0u);
  EXPECT_EQ(left[1], 0u);
  // Refused: f32 representatives; Quest over head_dim 80 (20 pieces do not divide a warp).
  EXPECT_FALSE(cuda::FusedShortlist(nullptr, 8, 4, 128, true, nullptr, DType::kF32, 2, 0, 100,
                                    false, 8, nullptr, nullptr, nullptr, counters, stream));
  EXPECT_FALSE(cuda::FusedShortlist(nullptr, 8, 4, 80, true, nullptr, DType::kBF16, 2, 0, 100,
                                    false, 8, nullptr, nullptr, nullptr, counters, stream));
  NEEDLE_CUDA_CHECK(cudaFree(counters));
}
#endif

}  // namespace
}  // namespace needle
