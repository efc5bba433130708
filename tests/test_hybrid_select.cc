// The hybrid engine's block selection kernels on the GPU (engine/cuda/block_select.h) against
// the planner's host code: the top-k, the grouped queries and the block scores. GPU only (they
// skip on CI with their reason).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
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
#include "engine/cuda/device_plan.h"
#include "engine/cuda/kernels.h"
#endif

namespace needle {
namespace {

#ifdef NEEDLE_HAVE_CUDA
// The GPU's block top-k picks exactly the planner's TopK: ties on score broken by the lower block
// id, per head and on scores summed over heads, shortlists longer than the candidates, more
// candidates than threads, and more than the kernel keeps in registers (8195, 20000). Without
// extremes, rows the kernel keeps in registers are settled by the value buckets (block_select.cu),
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

// One layer's representatives of nb blocks of 4 random keys (seeds seed, seed + 1).
std::unique_ptr<RepresentativeStore> RandomReps(int64_t Hk, int64_t D, int64_t nb, ReprType rt,
                                                DType st, uint64_t seed) {
  const int64_t B = 4;
  KVCache cache(KVCacheShape{1, Hk, D, nb * B, B, st});
  const auto k = test::RandomVector(nb * B * Hk * D, seed),
             v = test::RandomVector(k.size(), seed + 1);
  cache.Write(0, 0, nb * B, k.data(), v.data());
  cache.SetSize(nb * B);
  auto reps = std::make_unique<RepresentativeStore>(1, Hk, D, nb, rt, st);
  for (int64_t b = 0; b < nb; ++b) reps->ComputeFromKeys(0, b, cache.Layer(0));
  return reps;
}

// The GPU's block scores (bf16 representatives of 16-byte pieces: a slot per KV head striding
// over the blocks, several a warp; others: a warp an item) equal the host's within f32 rounding
// of sums taken in another order.
TEST(HybridSelect, ScoreBlocksEqualsHost) {
  NEEDLE_REQUIRE_GPU(gpu);
  ThreadingContext tc(1);
  // (7 and 3 KV heads: the vector kernel's slots are not a multiple of them. 6000 blocks of 4
  // heads: more items than the grid's slots, which then loop.)
  struct Shape {
    int64_t Hk, D, nb;
  };
  for (auto [Hk, D, nb] :
       {Shape{4, 128, 300}, Shape{8, 128, 300}, Shape{2, 64, 300}, Shape{1, 80, 300},
        Shape{7, 128, 300}, Shape{3, 64, 300}, Shape{4, 128, 6000}, Shape{7, 64, 3000}})
    for (ReprType rt : {ReprType::kQuest, ReprType::kMax})
      for (DType st : {DType::kBF16, DType::kF32}) {
        if (nb > 300 && st == DType::kF32) continue;  // (the scalar kernel: no slots)
        const auto store = RandomReps(Hk, D, nb, rt, st, 3);
        const RepresentativeStore& reps = *store;
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

// Scoring from the query itself (the vector kernel summing each group's queries) gives the same
// floats as the group queries' own kernel followed by the scoring: the same additions in the
// same order. Every representative type, GQA 1/4/7, head_dim 64/128, and a case (f32
// representatives) that falls back to the two kernels.
TEST(HybridSelect, ScoreFromQueryEqualsGroupThenScore) {
  NEEDLE_REQUIRE_GPU(gpu);
  struct Shape {
    int64_t heads, Hk, D, nb;
  };
  for (auto [heads, Hk, D, nb] : {Shape{28, 4, 128, 700}, Shape{32, 8, 128, 300},
                                  Shape{8, 8, 64, 300}, Shape{14, 2, 64, 5000}})
    for (ReprType rt : {ReprType::kQuest, ReprType::kMax, ReprType::kMean})
      for (DType st : {DType::kBF16, DType::kF32}) {
        const auto store = RandomReps(Hk, D, nb, rt, st, 7);
        const RepresentativeStore& reps = *store;
        const std::vector<float> q = test::RandomVector(heads * D, 9);
        const bool quest = rt == ReprType::kQuest;
        const size_t rb = reps.BlockBytes() * static_cast<size_t>(nb);
        const int64_t first = 3, n = nb - first, hd = Hk * D;
        // Device: reps, q, then (qa, qb, scores) twice.
        // (Each half 16-byte aligned, as the scorer's buffers: the vector kernel needs it.)
        const int64_t half = (2 * hd + Hk * n + 3) / 4 * 4;
        float* d = gpu->Alloc(rb / 4 + q.size() + static_cast<size_t>(2 * half));
        NEEDLE_CUDA_CHECK(cudaMemcpy(d, reps.Block(0, 0), rb, cudaMemcpyHostToDevice));
        float* dq = d + rb / 4;
        gpu->FromHost(q.data(), q.size(), dq);
        float *a = dq + q.size(), *b = a + half;
        const cudaStream_t s = CudaBackendStream(*gpu);
        cuda::GroupQueries(dq, heads, Hk, D, quest, a, a + hd, s);
        cuda::ScoreBlocks(d, st, reps.rows(), first, n, Hk, D, a, a + hd, a + 2 * hd, s);
        cuda::ScoreBlocksFromQuery(d, st, reps.rows(), first, n, Hk, heads / Hk, D, dq, quest, b,
                                   b + hd, b + 2 * hd, s);
        std::vector<float> want(static_cast<size_t>(Hk * n)), got(want.size());
        gpu->ToHost(a + 2 * hd, want.size(), want.data());
        gpu->ToHost(b + 2 * hd, got.size(), got.data());
        gpu->Free(d);
        for (size_t i = 0; i < want.size(); ++i)
          ASSERT_EQ(got[i], want[i]) << heads << "/" << Hk << "/" << D << " " << ReprTypeName(rt)
                                     << " " << DTypeName(st) << " at " << i;
      }
}

// The selection tests' device outputs, laid end to end from base: vals, ids [rows][want]; sel
// [Hk][n_sel]; kept [Hk][R]; kcount [Hk]; view [Hk][view_stride]; then whatever follows (after).
struct SelectOut {
  SelectOut(float* base, int64_t rows, int64_t want, int64_t Hk, int64_t n_sel, int64_t R,
            int64_t view_stride)
      : vals(base),
        ids(reinterpret_cast<int32_t*>(base + rows * want)),
        sel(ids + rows * want),
        kept(sel + Hk * n_sel),
        kcount(kept + Hk * R),
        view(kcount + Hk),
        after(view + Hk * view_stride) {}
  float* vals;
  int32_t *ids, *sel, *kept, *kcount, *view, *after;
};

// Host placement planned on the GPU: with a table per KV head whose -1 entries are blocks the GPU
// does not hold (SelectArgs::table_head_stride, cpu), the selection is what one shared table
// gives, each head's view entries are its own table's, holes included, and each head's holes are
// listed by their positions in its selection, ascending, with their count: fused with the top-k
// and in the selection's own kernel, per KV head and per layer.
TEST(HybridSelect, SelectionSplitsByResidency) {
  NEEDLE_REQUIRE_GPU(gpu);
  const cudaStream_t s = CudaBackendStream(*gpu);
  for (int64_t n : {int64_t{40}, int64_t{700}, int64_t{9000}})
    for (bool by_layer : {false, true})
      for (bool fused : {false, true}) {
        if (fused && !cuda::FusedSelectOn()) continue;
        const int64_t Hk = 4, topk = 24, R = 8, first = 2, want = topk + R, k = std::min(want, n);
        const int64_t ctx_end = first + n, n_sel = std::min(topk, n), vs = n_sel + 5;
        const int64_t rows = by_layer ? 1 : Hk, tw = ctx_end + 1;
        const std::vector<float> scores = test::RandomVector(Hk * n, 31 + n);
        std::vector<int32_t> ret(static_cast<size_t>(Hk * (R + 1)), -1);
        for (int64_t h = 0; h < Hk; ++h) {
          for (int64_t i = 0; i < R; ++i) ret[h * R + i] = static_cast<int32_t>(first + i * 3 + h);
          ret[Hk * R + h] = static_cast<int32_t>(R);
        }
        // Shared table, then one per head: -1 where (b + h) % 3 == 0.
        std::vector<int32_t> tables(static_cast<size_t>(tw + Hk * tw));
        for (int64_t b = 0; b < tw; ++b) tables[b] = static_cast<int32_t>(b * 3 + 1);
        for (int64_t h = 0; h < Hk; ++h)
          for (int64_t b = 0; b < tw; ++b)
            tables[tw + h * tw + b] = (b + h) % 3 == 0 ? -1 : static_cast<int32_t>(b * 5 + h);
        // Device, twice (shared table, per-head tables): vals, ids [rows][want], sel [Hk][n_sel],
        // kept [Hk][R], kcount [Hk], view [Hk][vs], cpu [Hk][n_sel], cpu_count [Hk]; then the
        // inputs.
        const int64_t per = 2 * rows * want + Hk * n_sel + Hk * R + Hk + Hk * vs + Hk * n_sel + Hk;
        float* d = gpu->Alloc(static_cast<size_t>(2 * per + Hk * n + Hk * (R + 1)) + tables.size());
        NEEDLE_CUDA_CHECK(cudaMemset(d, 0xff, static_cast<size_t>(2 * per) * 4));
        float* dsc = d + 2 * per;
        auto* dret = reinterpret_cast<int32_t*>(dsc + Hk * n);
        int32_t* dtab = dret + Hk * (R + 1);
        gpu->FromHost(scores.data(), scores.size(), dsc);
        NEEDLE_CUDA_CHECK(
            cudaMemcpy(dtab, tables.data(), tables.size() * 4, cudaMemcpyHostToDevice));
        std::vector<std::vector<int32_t>> out;
        for (int pass = 0; pass < 2; ++pass) {
          NEEDLE_CUDA_CHECK(cudaMemcpy(dret, ret.data(), ret.size() * 4, cudaMemcpyHostToDevice));
          NEEDLE_CUDA_CHECK(cudaDeviceSynchronize());
          const SelectOut o(d + pass * per, rows, want, Hk, n_sel, R, vs);
          float* vals = o.vals;
          int32_t *ids = o.ids, *sel = o.sel, *kept = o.kept, *kcount = o.kcount, *view = o.view;
          int32_t* cpu = o.after;
          cuda::SelectArgs sa = cuda::MakeSelectArgs(
              want, k, dret, dret + Hk * R, R, first, ctx_end, topk, Hk, by_layer,
              pass == 0 ? dtab : dtab + tw, n_sel, sel, kept, kcount, view, vs, 2);
          if (pass == 1) sa.table_head_stride = tw, sa.cpu = cpu, sa.cpu_count = cpu + Hk * n_sel;
          if (fused) {
            ASSERT_TRUE(cuda::TopBlocksSelect(dsc, Hk, n, by_layer, static_cast<int32_t>(first),
                                              want, vals, ids, sa, nullptr, s));
          } else {
            cuda::TopBlocks(dsc, Hk, n, by_layer, static_cast<int32_t>(first), want, vals, ids, s);
            cuda::SelectFromShortlist(vals, ids, want, k, sa, s);
          }
          NEEDLE_CUDA_CHECK(cudaStreamSynchronize(s));
          std::vector<int32_t> h(static_cast<size_t>(per - 2 * rows * want));
          NEEDLE_CUDA_CHECK(cudaMemcpy(h.data(), sel, h.size() * 4, cudaMemcpyDeviceToHost));
          out.push_back(h);
        }
        gpu->Free(d);
        const std::string what = "n " + std::to_string(n) + " by_layer " +
                                 std::to_string(by_layer) + " fused " + std::to_string(fused);
        // The selection, kept and kcount: as with the shared table.
        const size_t same = static_cast<size_t>(Hk * n_sel + Hk * R + Hk);
        ASSERT_TRUE(std::equal(out[0].begin(), out[0].begin() + same, out[1].begin())) << what;
        const int32_t* sel = out[1].data();
        const int32_t* view = sel + same;
        const int32_t* cpu = view + Hk * vs;
        for (int64_t h = 0; h < Hk; ++h) {
          std::vector<int32_t> holes;
          for (int64_t j = 0; j < n_sel; ++j) {
            const int32_t b = sel[h * n_sel + j];
            ASSERT_TRUE(b >= first && b < ctx_end) << what;
            const int32_t slot = tables[tw + h * tw + b];
            ASSERT_EQ(view[h * vs + 2 + j], slot) << what << " head " << h << " entry " << j;
            if (slot < 0) holes.push_back(static_cast<int32_t>(j));
          }
          ASSERT_FALSE(holes.empty()) << what;  // (a third of the blocks are holes)
          ASSERT_EQ(cpu[Hk * n_sel + h], static_cast<int32_t>(holes.size())) << what;
          for (size_t i = 0; i < holes.size(); ++i)
            ASSERT_EQ(cpu[h * n_sel + static_cast<int64_t>(i)], holes[i]) << what << " head " << h;
        }
      }
}

// The selection inside the top-k's kernel (TopBlocksSelect) writes what the top-k followed by
// the selection's own kernel writes: the selection, the kept retention and the view's entries,
// per KV head and per layer, with and without retention (some of it outside the Context), rows
// the value buckets settle and rows that take the radix passes; with the last step's retention
// in the same kernel first (RetainByMass's inputs: a selection, its blocks' sums in 2 tiles, the
// lse), what RetainByMass before them writes, the retention included.
TEST(HybridSelect, TopBlocksSelectEqualsTopBlocksThenSelect) {
  NEEDLE_REQUIRE_GPU(gpu);
  if (!cuda::FusedSelectOn()) GTEST_SKIP() << "NEEDLE_TOPK_SELECT=0: the selection is never fused";
  const cudaStream_t s = CudaBackendStream(*gpu);
  for (int64_t n : {int64_t{20}, int64_t{700}, int64_t{9000}})
    for (bool by_layer : {false, true})
      for (int64_t R : {int64_t{0}, int64_t{8}})
        for (int variant = 0; variant < 3; ++variant) {
          const bool seeded = variant == 1, retain_first = variant == 2 && R > 0;
          const int64_t Hk = 4, topk = 24, first = 2, want = topk + R, k = std::min(want, n);
          const int64_t ctx_end = first + n, n_sel = std::min(topk, n), stride = n_sel + 5;
          const int64_t rows = by_layer ? 1 : Hk;
          std::vector<float> scores = test::RandomVector(Hk * n, 11 + n);
          if (n == 9000) scores[5] = 3e38f;  // (the radix passes)
          // Retention [Hk][R] ascending, then rcount [Hk]: -1 (none), or R blocks, one of them
          // past the Context's end (not kept).
          std::vector<int32_t> ret(static_cast<size_t>(Hk * (R + 1)), -1);
          for (int64_t h = 0; h < Hk && R > 0; ++h) {
            for (int64_t i = 0; i + 1 < R; ++i)
              ret[h * R + i] = static_cast<int32_t>(first + i * (n / R) + h);
            ret[h * R + R - 1] = static_cast<int32_t>(ctx_end + h);
            ret[Hk * R + h] = seeded ? static_cast<int32_t>(R) : -1;
          }
          std::vector<int32_t> table(static_cast<size_t>(ctx_end + 1));
          for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i * 3 + 1);
          // Device, twice: vals, ids [rows][want]; sel [Hk][n_sel]; kept [Hk][R]; kcount [Hk];
          // view [Hk][stride]; then the inputs (scores, ret, table) once.
          const int64_t per = 2 * rows * want + Hk * n_sel + Hk * R + Hk + Hk * stride;
          float* d =
              gpu->Alloc(static_cast<size_t>(2 * per + Hk * n + Hk * (R + 1)) + table.size());
          NEEDLE_CUDA_CHECK(cudaMemset(d, 0xff, static_cast<size_t>(2 * per) * 4));
          float* dsc = d + 2 * per;
          auto* dret = reinterpret_cast<int32_t*>(dsc + Hk * n);
          int32_t* dtab = dret + Hk * (R + 1);
          gpu->FromHost(scores.data(), scores.size(), dsc);
          NEEDLE_CUDA_CHECK(cudaMemcpy(dret, ret.data(), ret.size() * 4, cudaMemcpyHostToDevice));
          NEEDLE_CUDA_CHECK(
              cudaMemcpy(dtab, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
          // The last step's selection [Hk][np] (ascending), sums [Hk][np][2][G][2], lse [Hk * G].
          const int64_t G = 3, np = n_sel, tiles = 2;
          std::vector<int32_t> prev(static_cast<size_t>(Hk * np));
          for (int64_t h = 0; h < Hk; ++h)
            for (int64_t i = 0; i < np; ++i)
              prev[h * np + i] = static_cast<int32_t>(first + i * (n / np) + (h + i) % (n / np));
          std::vector<float> stats = test::RandomVector(Hk * np * tiles * G * 2, 17 + n);
          for (size_t i = 1; i < stats.size(); i += 2) stats[i] = std::fabs(stats[i]) + 0.1f;
          const std::vector<float> lse = test::RandomVector(Hk * G, 19);
          float* dr = gpu->Alloc(prev.size() + stats.size() + lse.size());
          NEEDLE_CUDA_CHECK(cudaMemcpy(dr, prev.data(), prev.size() * 4, cudaMemcpyHostToDevice));
          gpu->FromHost(stats.data(), stats.size(), dr + prev.size());
          gpu->FromHost(lse.data(), lse.size(), dr + prev.size() + stats.size());
          const cuda::RetainArgs ra = cuda::MakeRetainArgs(
              reinterpret_cast<const int32_t*>(dr), np, dr + prev.size(), tiles,
              dr + prev.size() + stats.size(), Hk, G, by_layer, R, dret, dret + Hk * R);
          std::vector<std::vector<int32_t>> out;
          for (int pass = 0; pass < 2; ++pass) {
            NEEDLE_CUDA_CHECK(cudaMemcpy(dret, ret.data(), ret.size() * 4, cudaMemcpyHostToDevice));
            NEEDLE_CUDA_CHECK(cudaDeviceSynchronize());  // (the memset and copies, before s)
            const SelectOut o(d + pass * per, rows, want, Hk, n_sel, R, stride);
            float* vals = o.vals;
            int32_t *ids = o.ids, *sel = o.sel, *kept = o.kept, *kcount = o.kcount, *view = o.view;
            const cuda::SelectArgs sa =
                cuda::MakeSelectArgs(want, k, dret, dret + Hk * R, R, first, ctx_end, topk, Hk,
                                     by_layer, dtab, n_sel, sel, kept, kcount, view, stride, 2);
            if (pass == 0) {
              if (retain_first)
                cuda::RetainByMass(reinterpret_cast<const int32_t*>(dr), np, dr + prev.size(),
                                   tiles, dr + prev.size() + stats.size(), Hk, G, by_layer, R, dret,
                                   dret + Hk * R, s);
              cuda::TopBlocks(dsc, Hk, n, by_layer, static_cast<int32_t>(first), want, vals, ids,
                              s);
              cuda::SelectFromShortlist(vals, ids, want, k, dret, dret + Hk * R, R, first, ctx_end,
                                        topk, Hk, by_layer, dtab, n_sel, sel, kept, kcount, view,
                                        stride, 2, s);
            } else {
              ASSERT_TRUE(cuda::TopBlocksSelect(dsc, Hk, n, by_layer, static_cast<int32_t>(first),
                                                want, vals, ids, sa, retain_first ? &ra : nullptr,
                                                s));
            }
            // (The backend's stream does not wait for the legacy stream's copies, nor they for
            // it.)
            NEEDLE_CUDA_CHECK(cudaStreamSynchronize(s));
            // The selection, kept, kcount and view, then the retention.
            const size_t n_out = static_cast<size_t>(Hk * n_sel + Hk * R + Hk + Hk * stride);
            std::vector<int32_t> h(n_out + ret.size());
            NEEDLE_CUDA_CHECK(cudaMemcpy(h.data(), sel, n_out * 4, cudaMemcpyDeviceToHost));
            NEEDLE_CUDA_CHECK(
                cudaMemcpy(h.data() + n_out, dret, ret.size() * 4, cudaMemcpyDeviceToHost));
            out.push_back(h);
          }
          gpu->Free(dr);
          gpu->Free(d);
          if (retain_first) {  // (the retention was computed: counts of R, not the seed's -1s)
            ASSERT_EQ(out[1].back(), static_cast<int32_t>(R));
          }
          ASSERT_EQ(out[0], out[1])
              << "n " << n << " by_layer " << by_layer << " R " << R << " variant " << variant;
          // (Something was selected: not two untouched buffers.)
          ASSERT_GE(out[1][0], first);
        }
}
#endif

}  // namespace
}  // namespace needle
