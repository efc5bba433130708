// The prompt's last query of a sparse chunked prefill: it selects its Context blocks alone (it
// predicts the first answer token), re-ranks them by their best single key (--rescore-last), and
// seeds the first decode step's retention from the blocks it attended, as it attended them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/cpu/ops.h"
#include "sparse_attn/observation.h"
#include "sparse_attn/plan.h"
#include "sparse_attn/representatives.h"
#include "sparse_attn/scoring.h"
#include "sparse_attn/sparse_attention.h"
#include "tests/sparse_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

using test::MaxDiff;

// The last-query tests' settings: one Context block per selection, 16-query chunks, no retention.
SparseConfig OneBlockPrefill(int64_t B) {
  SparseConfig c;
  c.block_size = B, c.init_tokens = 4, c.local_window = 8, c.topk = 1, c.dense_layers = 0;
  c.retain_blocks = 0, c.sparse_prefill = true, c.prefill_chunk = 16,
  c.select = SelectMode::kKVHead;
  return c;
}

// The last-query tests' inputs for one seed: one layer of N tokens of one KV head (D = 16),
// 2 query heads, blocks of 4; random keys k [N, D], values and queries q [N, H, D].
struct LastQueryInputs {
  static constexpr int64_t D = 16, Hk = 1, H = 2, B = 4, N = 64;
  std::vector<float> k, q;
  KVCache cache;
  explicit LastQueryInputs(uint64_t seed)
      : k(test::RandomVector(N * Hk * D, seed)),
        q(test::RandomVector(N * H * D, seed + 2, 2.f)),
        cache(KVCacheShape{1, Hk, D, N, B, DType::kF32}) {
    const auto v = test::RandomVector(N * Hk * D, seed + 1);
    cache.Write(0, 0, N, k.data(), v.data());
    cache.SetSize(N);
  }
};

// The outputs [N, H, D] of one sparse prefill of the N queries q over layer 0 of `cache`
// (the shapes of m: H query heads of D).
std::vector<float> PrefillOutputs(const ModelConfig& m, const SparseConfig& c, Backend& backend,
                                  ThreadingContext& tc, const std::vector<float>& q, KVCache& cache,
                                  int64_t N) {
  const int64_t H = m.num_heads, D = m.head_dim;
  cache.SetSize(0);
  SparseAttention sp(m, c, backend, tc, N, DType::kF32);
  AttnArgs a{N, 0, H, m.num_kv_heads, D, 0, 0.25f};
  std::vector<float> out(static_cast<size_t>(N * H * D));
  sp.BeginStep(StepInfo{0, N, N, true});
  sp.Attend(0, q.data(), a, cache, out.data());
  cache.SetSize(N);
  return out;
}

// The reference output [H, D] of the last of N queries (ql) over Initial + `blocks` + Local.
std::vector<float> LastQueryReference(const ModelConfig& m, const SparseConfig& c,
                                      const std::vector<int32_t>& blocks, const float* ql,
                                      KVCache& cache, int64_t N, ThreadingContext& tc) {
  const int64_t H = m.num_heads, D = m.head_dim;
  AttnSpans spans;
  spans.offsets.assign(1, 0);
  std::map<int64_t, int32_t> rows;
  AppendQuerySpans(c.init_end(), blocks, c.block_size, c.LocalBegin(N - 1), N - 1, nullptr, D,
                   &spans, &rows);
  AttnArgs a1{1, N - 1, H, m.num_kv_heads, D, 0, 0.25f};
  std::vector<float> want(static_cast<size_t>(H * D));
  ref::Attention(ql, cache.Layer(0), a1, &spans, want.data(), nullptr, tc);
  return want;
}

// In a sparse prefill longer than one chunk, the prompt's last query (it predicts the first answer
// token) selects its Context blocks alone, as a decode query does: its output equals attention over
// Initial + the top block by its own scores + Local, not the top block of its chunk's summed
// scores (which differ here, checked).
TEST(Sparse, SparsePrefillsLastQuerySelectsAlone) {
  using In = LastQueryInputs;
  const int64_t D = In::D, Hk = In::Hk, H = In::H, B = In::B, N = In::N;
  SparseConfig c = OneBlockPrefill(B);
  c.rescore_last = 0;  // (by its Quest scores)
  const ModelConfig m = test::AttentionShapes(1, H, Hk, D);
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  // The first inputs (seeds) whose two selections differ, so that the test can tell them apart.
  for (uint64_t seed = 21;; seed += 3) {
    ASSERT_LT(seed, 200u) << "no inputs where the two selections differ";
    In in(seed);
    const std::vector<float>& q = in.q;
    KVCache& cache = in.cache;
    // The selections by the last query alone and by its 16-query chunk, from Quest scores.
    RepresentativeStore reps(1, Hk, D, N / B, ReprType::kQuest, DType::kF32);
    const auto select = [&](int64_t t0, int64_t T, int64_t p) {
      std::vector<int32_t> ids;
      for (int64_t b = c.init_end() / B; b < c.LocalBegin(p) / B; ++b) {
        ids.push_back(static_cast<int32_t>(b));
        reps.ComputeFromKeys(0, b, cache.Layer(0));
      }
      std::vector<float> sc(ids.size());
      fast::ScoreBlocks(reps, 0,
                        ScoreArgs{q.data() + t0 * H * D, T, H, Hk, D, ids.data(),
                                  static_cast<int64_t>(ids.size())},
                        sc.data(), tc);
      return TopK(sc.data(), ids.data(), static_cast<int64_t>(ids.size()), 1);
    };
    const std::vector<int32_t> alone = select(N - 1, 1, N - 1), chunk = select(48, 16, 48);
    if (alone == chunk) continue;
    const std::vector<float> out = PrefillOutputs(m, c, *backend, tc, q, cache, N);
    const std::vector<float> want =
        LastQueryReference(m, c, alone, q.data() + (N - 1) * H * D, cache, N, tc);
    for (int64_t i = 0; i < H * D; ++i)
      ASSERT_NEAR(out[(N - 1) * H * D + i], want[i], 1e-5 * (1 + std::fabs(want[i])))
          << "seed " << seed << " " << i;
    break;
  }
}

// With rescore_last covering every candidate, the prompt's last query (selecting alone) takes the
// Context block whose best single key scores highest (a brute force in double here), where
// Quest's bound would take another (inputs chosen so; checked); every other query of the prompt
// attends as without it (its chunk re-ranks nothing).
TEST(Sparse, SparsePrefillsLastQueryReRanksByTheBestKey) {
  using In = LastQueryInputs;
  const int64_t D = In::D, Hk = In::Hk, H = In::H, B = In::B, N = In::N;
  SparseConfig c = OneBlockPrefill(B);
  const ModelConfig m = test::AttentionShapes(1, H, Hk, D);
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  for (uint64_t seed = 31;; seed += 3) {
    ASSERT_LT(seed, 300u) << "no inputs where Quest and the best key select differently";
    In in(seed);
    const std::vector<float>&k = in.k, &q = in.q;
    KVCache& cache = in.cache;
    const float* ql = q.data() + (N - 1) * H * D;
    RepresentativeStore reps(1, Hk, D, N / B, ReprType::kQuest, DType::kF32);
    std::vector<int32_t> ids;
    std::vector<float> best;
    for (int64_t b = c.init_end() / B; b < c.LocalBegin(N - 1) / B; ++b) {
      ids.push_back(static_cast<int32_t>(b));
      reps.ComputeFromKeys(0, b, cache.Layer(0));
      double top = -INFINITY;
      for (int64_t t = b * B; t < (b + 1) * B; ++t) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d)
          dot += (static_cast<double>(ql[d]) + ql[D + d]) * k[t * D + d];
        top = std::max(top, dot);
      }
      best.push_back(static_cast<float>(top));
    }
    const int64_t n = static_cast<int64_t>(ids.size());
    std::vector<float> quest(static_cast<size_t>(n));
    fast::ScoreBlocks(reps, 0, ScoreArgs{ql, 1, H, Hk, D, ids.data(), n}, quest.data(), tc);
    const std::vector<int32_t> by_best = TopK(best.data(), ids.data(), n, 1);
    if (by_best == TopK(quest.data(), ids.data(), n, 1)) continue;
    std::vector<float> outs[2];
    for (int64_t last : {0, 1000}) {
      c.rescore_last = last;
      outs[last > 0] = PrefillOutputs(m, c, *backend, tc, q, cache, N);
    }
    const std::vector<float> want = LastQueryReference(m, c, by_best, ql, cache, N, tc);
    for (int64_t i = 0; i < H * D; ++i)
      ASSERT_NEAR(outs[1][(N - 1) * H * D + i], want[i], 1e-5 * (1 + std::fabs(want[i])))
          << "seed " << seed << " " << i;
    double moved = 0;
    for (int64_t i = (N - 1) * H * D; i < N * H * D; ++i)
      moved = std::max(moved, static_cast<double>(std::fabs(outs[1][i] - outs[0][i])));
    EXPECT_GT(moved, 1e-3) << "seed " << seed << ": Quest's block gave the same output";
    EXPECT_EQ(MaxDiff(outs[1], outs[0], (N - 1) * H * D), 0.0) << "seed " << seed;
    break;
  }
}

// A sparse prefill seeds the first decode step's retention from what its last query attended:
// the blocks it selected (alone), with the softmax mass it put on each as it attended them
// (remapped: each block's keys scored by the query rotated as AppendQuerySpans rotates it), the
// heaviest each followed by its successor. The expected seed is computed here from the inputs:
// the selection from Quest scores, the lse from the reference kernel, the masses in double.
TEST(Sparse, SparsePrefillSeedsRetentionFromItsLastQuerysBlocks) {
  const int64_t D = 16, Hk = 2, G = 2, H = Hk * G, B = 4, N = 96, ie = 4;
  const ModelConfig m = test::AttentionShapes(1, H, Hk, D);
  ThreadingContext tc(2);
  auto backend = MakeCpuBackend(tc, false);
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i)
    inv_freq[i] = static_cast<float>(std::pow(500.0, -2.0 * i / static_cast<double>(D)));
  const auto k = test::RandomVector((N + 1) * Hk * D, 61),
             v = test::RandomVector((N + 1) * Hk * D, 62);
  const auto q = test::RandomVector((N + 1) * H * D, 63, 2.f);
  const float scale = 0.25f;
  for (bool remap : {false, true})
    for (SelectMode sm : {SelectMode::kLayer, SelectMode::kKVHead}) {
      SparseConfig c;
      c.block_size = B, c.init_tokens = ie, c.local_window = 8, c.topk = 6, c.dense_layers = 0;
      c.retain_blocks = 3, c.sparse_prefill = true, c.prefill_chunk = 16, c.select = sm;
      c.pos_remap = remap, c.rescore_last = 0;  // (the last query selects by Quest)
      const std::string what =
          std::string(SelectModeName(sm)) + (remap ? " remapped" : " not remapped");
      KVCache cache(KVCacheShape{1, Hk, D, N + 1, B, DType::kF32});
      cache.Write(0, 0, N + 1, k.data(), v.data());
      cache.SetSize(0);
      SparseAttention sp(m, c, *backend, tc, N + 1, DType::kF32);
      std::vector<float> out(static_cast<size_t>((N + 1) * H * D));
      AttnArgs a{N, 0, H, Hk, D, 0, scale, inv_freq.data()};
      sp.BeginStep(StepInfo{0, N, N, true});
      sp.Attend(0, q.data(), a, cache, out.data());
      cache.SetSize(N + 1);
      AttnArgs ad{1, N, H, Hk, D, 0, scale, inv_freq.data()};
      sp.BeginStep(StepInfo{N, 1, 1, true});
      sp.Attend(0, q.data() + N * H * D, ad, cache, out.data() + N * H * D);
      const LayerPlan& p0 = sp.last_plan(0);
      // The last query (at N - 1) selects alone from its own Quest scores.
      const int64_t p = N - 1, lb = c.LocalBegin(p);
      const float* rel = remap ? inv_freq.data() : nullptr;
      RepresentativeStore reps(1, Hk, D, N / B, ReprType::kQuest, DType::kF32);
      std::vector<int32_t> ids;
      cache.SetSize(N);
      for (int64_t b = ie / B; b < lb / B; ++b) {
        ids.push_back(static_cast<int32_t>(b));
        reps.ComputeFromKeys(0, b, cache.Layer(0), rel);
      }
      const int64_t n = static_cast<int64_t>(ids.size());
      std::vector<float> ql(q.begin() + p * H * D, q.begin() + (p + 1) * H * D), row(D);
      std::vector<float> qs = ql;
      if (remap) {
        RotationRow(c.RemapScoreShift(lb), inv_freq.data(), D, row.data());
        RotateRows(ql.data(), H, D, row.data(), qs.data());
      }
      std::vector<float> sc(static_cast<size_t>(Hk * n));
      fast::ScoreBlocks(reps, 0, ScoreArgs{qs.data(), 1, H, Hk, D, ids.data(), n}, sc.data(), tc);
      std::vector<std::vector<int32_t>> sel(static_cast<size_t>(Hk));
      if (sm == SelectMode::kLayer) SumOverHeads(sc.data(), Hk, n);
      for (int64_t h = 0; h < Hk; ++h)
        sel[h] = TopK(sc.data() + (sm == SelectMode::kLayer ? 0 : h * n), ids.data(), n, c.topk);
      // Its lse over Initial + the selection + Local, as attended.
      AttnSpans spans;
      spans.offsets.assign(1, 0);
      std::map<int64_t, int32_t> rows;
      for (int64_t h = 0; h < Hk; ++h)
        AppendQuerySpans(c.init_end(), sel[h], B, lb, p, rel, D, &spans, &rows);
      std::vector<float> o(static_cast<size_t>(H * D)), lse(static_cast<size_t>(H));
      AttnArgs al{1, p, H, Hk, D, 0, scale, inv_freq.data()};
      ref::Attention(ql.data(), cache.Layer(0), al, &spans, o.data(), lse.data(), tc);
      // Each selected block's mass, in double, then the heaviest with their successors.
      std::vector<std::vector<double>> mass(static_cast<size_t>(Hk));
      for (int64_t h = 0; h < Hk; ++h)
        for (size_t i = 0; i < sel[h].size(); ++i) {
          const int64_t b0 = int64_t{sel[h][i]} * B;
          std::vector<float> qr = ql;
          if (remap) {
            RotationRow(RemapBlockDelta(c.init_end(), static_cast<int64_t>(sel[h].size()), B, lb,
                                        static_cast<int64_t>(i), b0),
                        inv_freq.data(), D, row.data());
            RotateRows(ql.data(), H, D, row.data(), qr.data());
          }
          double sum = 0;
          for (int64_t g = 0; g < G; ++g)
            for (int64_t j = b0; j < b0 + B; ++j) {
              double dot = 0;
              for (int64_t d = 0; d < D; ++d)
                dot += static_cast<double>(qr[(h * G + g) * D + d]) * k[(j * Hk + h) * D + d];
              sum += std::exp(scale * dot - lse[h * G + g]);
            }
          mass[h].push_back(sum);
        }
      ASSERT_EQ(p0.retained.size(), static_cast<size_t>(Hk)) << what;
      const auto want = test::KeptByMass(mass, sel, sm == SelectMode::kLayer, c.retained());
      for (int64_t h = 0; h < Hk; ++h) EXPECT_EQ(p0.retained[h], want[h]) << what << " head " << h;
    }
}

// rescore_last is refused below topk; the settings name it with a sparse prefill only (a dense
// prefill's last query attends every key: it does not apply there).
TEST(Sparse, RescoreLastIsRefusedBelowTopk) {
  SparseConfig c;
  c.sparse_prefill = true;
  c.rescore_last = 8;
  test::ExpectErrorContaining([&] { c.Validate(); }, {"rescore_last", "8", "topk", "32"});
  c.rescore_last = 1000;
  c.Validate();
  EXPECT_NE(c.Describe().find("rescore_last=1000"), std::string::npos) << c.Describe();
  c.sparse_prefill = false;
  c.Validate();
  EXPECT_EQ(c.Describe().find("rescore_last"), std::string::npos) << c.Describe();
}

}  // namespace
}  // namespace needle
