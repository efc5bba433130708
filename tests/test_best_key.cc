// Re-ranking by the best single key (sparse_attn/best_key.h, --rescore): the scores against a
// brute force over the raw keys, Quest's score as their upper bound, and the ranking.
//
// Tolerances: the scores are f32 sums of D products of O(1) terms after one rotation of each key
// (relative error ~1e-6); 1e-4 of their magnitude. A bf16 cache stores each key rounded to 8
// significant bits (2^-9 relative), so there 1e-2.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/base/threading.h"
#include "engine/cpu/ops.h"
#include "kvcache/kv_cache.h"
#include "sparse_attn/best_key.h"
#include "sparse_attn/observation.h"
#include "sparse_attn/plan_rules.h"
#include "sparse_attn/representatives.h"
#include "sparse_attn/scoring.h"
#include "sparse_attn/sparse_config.h"
#include "tests/test_util.h"

namespace needle {
namespace {

struct KeysAndQueries {
  static constexpr int64_t Hk = 2, G = 3, D = 16, B = 8, n_blocks = 10, n_tok = B * n_blocks,
                           nq = 2;
  std::vector<float> inv_freq, kr, ks, q;
  KeysAndQueries() : inv_freq(D / 2) {
    for (int64_t i = 0; i < D / 2; ++i) inv_freq[i] = std::pow(100.f, -2.f * i / D);
    kr = test::RandomVector(n_tok * Hk * D, 41, 2.f);  // raw keys [t][h][D]
    ks.resize(kr.size());
    std::vector<float> row(D);
    for (int64_t t = 0; t < n_tok; ++t) {  // stored rotated at their true positions
      RotationRow(t, inv_freq.data(), D, row.data());
      RotateRows(kr.data() + t * Hk * D, Hk, D, row.data(), ks.data() + t * Hk * D);
    }
    q = test::RandomVector(nq * Hk * G * D, 42);
  }
  // max over the block's keys of (sum of the group's queries) . key, the key at its offset j in
  // the block (remap) or at its true position, in double.
  double Want(int64_t b, int64_t h, bool remap) const {
    std::vector<float> row(D), k(D);
    double best = -INFINITY;
    for (int64_t j = 0; j < B; ++j) {
      const int64_t t = b * B + j;
      RotationRow(remap ? j : t, inv_freq.data(), D, row.data());
      RotateRows(kr.data() + (t * Hk + h) * D, 1, D, row.data(), k.data());
      double dot = 0;
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d)
            dot += static_cast<double>(q[((i * Hk + h) * G + g) * D + d]) * k[d];
      best = std::max(best, dot);
    }
    return best;
  }
};

TEST(BestKey, ScoresEqualBruteForceAndQuestBoundsThem) {
  ThreadingContext tc(1);
  ThreadingContext tc3(3);  // the blocks in pieces of 4 over three threads
  const KeysAndQueries s;
  const int64_t Hk = s.Hk, D = s.D, B = s.B, n = s.n_blocks;
  std::vector<int32_t> ids(n);
  for (int64_t b = 0; b < n; ++b) ids[b] = static_cast<int32_t>((b * 7) % n);  // any order
  for (DType kvt : {DType::kF32, DType::kBF16}) {
    KVCache cache(KVCacheShape{1, Hk, D, s.n_tok, B, kvt});
    const std::vector<float> v(s.ks.size(), 0.f);
    cache.Write(0, 0, s.n_tok, s.ks.data(), v.data());
    cache.SetSize(s.n_tok);
    const double tol = kvt == DType::kF32 ? 1e-4 : 1e-2;
    for (bool remap : {false, true}) {
      const float* rel = remap ? s.inv_freq.data() : nullptr;
      const ScoreArgs a{s.q.data(), s.nq, Hk * s.G, Hk, D, ids.data(), n};
      std::vector<float> all(n), per(n);
      BestKeyScores(a, nullptr, cache.Layer(0), rel, -1, tc3, all.data());
      RepresentativeStore quest(1, Hk, D, n, ReprType::kQuest, DType::kF32);
      for (int64_t b = 0; b < n; ++b) quest.ComputeFromKeys(0, b, cache.Layer(0), rel);
      std::vector<float> bound(Hk * n);
      fast::ScoreBlocks(quest, 0, a, bound.data(), tc);
      std::vector<double> sum(n, 0.0);
      for (int64_t h = 0; h < Hk; ++h) {
        BestKeyScores(a, nullptr, cache.Layer(0), rel, h, tc, per.data());
        for (int64_t j = 0; j < n; ++j) {
          const double want = s.Want(ids[j], h, remap);
          sum[j] += want;
          ASSERT_NEAR(per[j], want, tol * (std::fabs(want) + 1))
              << KVTypeName(kvt) << " remap " << remap << " block " << ids[j] << " head " << h;
          // Quest's score (over the same stored keys) is an upper bound.
          EXPECT_GE(bound[h * n + j], per[j] - 1e-4 * (std::fabs(per[j]) + 1))
              << "block " << ids[j] << " head " << h;
        }
      }
      for (int64_t j = 0; j < n; ++j)
        ASSERT_NEAR(all[j], sum[j], tol * (std::fabs(sum[j]) + 1)) << "block " << ids[j];
      // From the queries summed already, as Quest's pair (an executor's ChunkQueries) gives
      // them: positive and negative parts added back.
      std::vector<float> qa(Hk * D), qb(Hk * D), from_sums(n);
      GroupQueries(a, true, qa.data(), qb.data());
      const std::vector<float> qs = CombineQuerySums(qa, qb);
      BestKeyScores(a, qs.data(), cache.Layer(0), rel, -1, tc3, from_sums.data());
      for (int64_t j = 0; j < n; ++j)
        ASSERT_NEAR(from_sums[j], all[j], 1e-4 * (std::fabs(all[j]) + 1)) << "block " << ids[j];
    }
  }
}

TEST(BestKey, RankingReRanksTheShortlistOnly) {
  ThreadingContext tc(2);
  const KeysAndQueries s;
  const int64_t Hk = s.Hk, D = s.D, B = s.B, n = s.n_blocks;
  KVCache cache(KVCacheShape{1, Hk, D, s.n_tok, B, DType::kF32});
  const std::vector<float> v(s.ks.size(), 0.f);
  cache.Write(0, 0, s.n_tok, s.ks.data(), v.data());
  cache.SetSize(s.n_tok);
  std::vector<int32_t> ids(n);
  std::vector<float> score(n), best(n);
  for (int64_t b = 0; b < n; ++b) {
    ids[b] = static_cast<int32_t>(b);
    score[b] = static_cast<float>((b * 3) % n);  // a representative's ranking, unrelated
    best[b] = static_cast<float>(s.Want(b, 1, false));
  }
  const ScoreArgs a{s.q.data(), s.nq, Hk * s.G, Hk, D, nullptr, 0};
  const KVLayerView kv = cache.Layer(0);
  // Off (0) or no larger than want: the representatives' ranking.
  for (int64_t r : {0, 3})
    EXPECT_EQ(RankCandidates(score.data(), ids.data(), n, 3, r, a, nullptr, kv, nullptr, 1, tc),
              TopK(score.data(), ids.data(), n, 3));
  // Covering every candidate: the best keys' ranking.
  EXPECT_EQ(RankCandidates(score.data(), ids.data(), n, 3, n, a, nullptr, kv, nullptr, 1, tc),
            TopK(best.data(), ids.data(), n, 3));
  // In between: the best keys' ranking among the shortlist.
  const std::vector<int32_t> shortlist = TopK(score.data(), ids.data(), n, 6);
  std::vector<float> sb;
  for (int32_t b : shortlist) sb.push_back(best[b]);
  EXPECT_EQ(RankCandidates(score.data(), ids.data(), n, 3, 6, a, nullptr, kv, nullptr, 1, tc),
            TopK(sb.data(), shortlist.data(), 6, 3));
}

TEST(BestKey, RescoreBelowTopkIsRefused) {
  SparseConfig c;
  c.rescore_blocks = 8;
  test::ExpectErrorContaining([&] { c.Validate(); }, {"rescore_blocks", "8", "topk", "32"});
  c.rescore_blocks = 32;
  c.Validate();
}

// TopK against its definition (every candidate sorted by plan_rules::Better, the first k, ids
// ascending), on lists of 0 to 100: scores from a few values (many ties, broken by the lower
// id), repeated (score, id) pairs, NaN scores (then any k of them will do: only the count and
// the order are checked), every k from 0 past n.
TEST(BestKey, TopKEqualsItsDefinition) {
  uint64_t x = 0x9e3779b97f4a7c15ull;
  auto next = [&] { return x ^= x << 13, x ^= x >> 7, x ^= x << 17; };
  for (int n : {0, 1, 2, 7, 40, 63, 64, 65, 100})
    for (int variant = 0; variant < 3; ++variant) {  // distinct ids, repeated pairs, a NaN
      std::vector<float> sc(static_cast<size_t>(n));
      std::vector<int32_t> ids(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) {
        sc[i] = static_cast<float>(next() % 5);
        ids[i] = static_cast<int32_t>(1000 - 7 * i + static_cast<int>(next() % 3) * 1000);
      }
      if (variant == 1 && n >= 4) sc[3] = sc[1], ids[3] = ids[1];
      if (variant == 2 && n >= 3) sc[2] = std::nanf("");
      std::vector<int> order(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return plan_rules::Better(sc[a], ids[a], sc[b], ids[b]);
      });
      for (int k = 0; k <= n + 2; ++k) {
        const std::vector<int32_t> got = TopK(sc.data(), ids.data(), n, k);
        const int kk = std::min(k, n);
        ASSERT_EQ(static_cast<int>(got.size()), kk) << n << " " << variant << " " << k;
        ASSERT_TRUE(std::is_sorted(got.begin(), got.end())) << n << " " << variant << " " << k;
        if (variant == 2 && n >= 3) continue;
        std::vector<int32_t> want;
        for (int i = 0; i < kk; ++i) want.push_back(ids[order[i]]);
        std::sort(want.begin(), want.end());
        ASSERT_EQ(got, want) << n << " " << variant << " " << k;
      }
    }
}

}  // namespace
}  // namespace needle
