// Decode steps planned by the executor (PlanExecutor::PlanDecode, what the hybrid engine's device
// placement does on the GPU so that the host waits for no layer): a CPU executor that plans with
// plan_rules.h alone, as the GPU's kernels do, gives the planner's own plans and outputs, with
// the retention handed over both ways (the prompt's seed to the executor, the executor's back
// when the planner plans a step itself).
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "sparse_attn/plan_rules.h"
#include "sparse_attn/scoring.h"
#include "sparse_attn/sparse_attention.h"
#include "tests/sparse_test_util.h"
#include "tests/test_util.h"

namespace needle {
namespace {

namespace pr = plan_rules;

// plan_rules::KeepByMass as the GPU's RetainKernel computes it: every candidate marked when it is
// the first of its value (FirstCandidate, one per thread there), each marked one placed by the
// count of marks before it, the first R of them sorted by CountBelow.
std::vector<int32_t> ParallelKeepByMass(const int32_t* blocks, const int* order, int n, int R) {
  std::vector<int32_t> cand(static_cast<size_t>(2 * n));
  for (int c = 0; c < 2 * n; ++c) cand[c] = pr::MassCandidate(blocks, order, c);
  std::vector<int> first(static_cast<size_t>(2 * n));
  for (int c = 0; c < 2 * n; ++c) first[c] = pr::FirstCandidate(cand.data(), c);
  std::vector<int32_t> out(static_cast<size_t>(R));
  int total = 0;
  for (int c = 0; c < 2 * n; ++c) {
    if (first[c] == 0) continue;
    const int at = std::accumulate(first.begin(), first.begin() + c, 0);
    if (at < R) out[at] = cand[c];
    ++total;
  }
  const int cnt = std::min(total, R);
  std::vector<int32_t> sorted(static_cast<size_t>(cnt));
  for (int i = 0; i < cnt; ++i) sorted[pr::CountBelow(out.data(), cnt, out[i])] = out[i];
  return sorted;
}

// A block's sums from its tiles' (the hybrid's GPU share): its mass equals the sum of the tiles'
// masses (as RetainByMass adds them) within f32 rounding, for any mix of empty tiles, scales far
// apart and query heads without keys; a block of empty tiles gets {-inf, 0} and no mass.
TEST(PlanRules, BlockFromTilesKeepsTheMass) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-30.f, 30.f), w(0.f, 40.f);
  for (int trial = 0; trial < 500; ++trial) {
    const int T = 1 + static_cast<int>(rng() % 4), G = 1 + static_cast<int>(rng() % 8);
    std::vector<float> tiles(static_cast<size_t>(T * G * 2)), lse(static_cast<size_t>(G));
    for (int t = 0; t < T; ++t)
      for (int g = 0; g < G; ++g) {
        float* x = &tiles[static_cast<size_t>((t * G + g) * 2)];
        const bool empty = rng() % 4 == 0;
        x[0] = empty ? (rng() % 2 == 0 ? -INFINITY : u(rng)) : u(rng);
        x[1] = empty ? 0.f : 1.f + w(rng);
      }
    for (auto& l : lse) l = 35.f + u(rng);
    std::vector<float> st(static_cast<size_t>(G * 2));
    pr::BlockFromTiles(tiles.data(), T, G, st.data());
    float tile_mass = 0.f;
    for (int t = 0; t < T; ++t)
      tile_mass += pr::BlockMass(&tiles[static_cast<size_t>(t * G * 2)], lse.data(), G);
    const float mass = pr::BlockMass(st.data(), lse.data(), G);
    ASSERT_NEAR(mass, tile_mass, 1e-5f * tile_mass + 1e-30f) << "trial " << trial;
    for (int g = 0; g < G; ++g) {
      bool any = false;
      for (int t = 0; t < T; ++t)
        any = any || tiles[static_cast<size_t>((t * G + g) * 2 + 1)] > 0.f;
      if (!any) {
        EXPECT_EQ(st[static_cast<size_t>(2 * g)], -INFINITY);
        EXPECT_EQ(st[static_cast<size_t>(2 * g + 1)], 0.f);
      } else {
        EXPECT_GE(st[static_cast<size_t>(2 * g + 1)], 1.f);  // (the largest tile's l, at least)
      }
    }
  }
}

// The parallel form gives the walk's retention on random selections, many of them runs of
// neighbouring blocks (a block's successor is often selected too: candidates repeat).
TEST(PlanRules, ParallelKeepByMassEqualsTheWalk) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40), R = static_cast<int>(rng() % 24);
    std::vector<int32_t> blocks;
    int32_t b = static_cast<int32_t>(rng() % 5);
    while (static_cast<int>(blocks.size()) < n) {
      blocks.push_back(b);
      b += 1 + (rng() % 3 == 0 ? static_cast<int32_t>(rng() % 9) : 0);
    }
    std::vector<int> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<int32_t> walk(static_cast<size_t>(R));
    walk.resize(
        static_cast<size_t>(pr::KeepByMass(blocks.data(), order.data(), n, R, walk.data())));
    ASSERT_EQ(ParallelKeepByMass(blocks.data(), order.data(), n, R), walk)
        << "trial " << trial << " n " << n << " R " << R;
  }
}

// The CPU reference of the GPU's executor plan: scores, a shortlist in a scrambled order,
// plan_rules' selection, the attention over Initial + selected + Local, block masses from the
// selected blocks' softmax sums (AttendBlocks', as the GPU's BlockStats) and the step's lse.
class RuleExecutor final : public CpuPlanExecutor {
 public:
  RuleExecutor(Backend& b, ThreadingContext& tc, int64_t layers)
      : CpuPlanExecutor(b), b_(b), tc_(tc), ret_(static_cast<size_t>(layers)) {}
  bool plans = true;  // PlansDecode's answer (a test turns it off midway)
  int64_t planned = 0, seeds = 0, taken = 0;

  bool PlansDecode() const override { return plans; }
  void PlanDecode(int64_t layer, const float* q, const AttnArgs& a, const KVLayerView& kv,
                  const RepresentativeStore& reps, const ExecutorPlan& p, float* out,
                  LayerPlan* plan) override {
    ++planned;
    const int64_t Hk = a.kv_heads, G = a.heads / Hk, n = p.ctx_end_block - p.init_blocks;
    auto& ret = ret_[static_cast<size_t>(layer)];
    if (p.seed != nullptr) ret = *p.seed, ++seeds;
    const bool has_ret = ret.size() == static_cast<size_t>(Hk);
    std::vector<int32_t> all(static_cast<size_t>(n));
    std::iota(all.begin(), all.end(), static_cast<int32_t>(p.init_blocks));
    std::vector<float> sc(static_cast<size_t>(Hk * n));
    fast::ScoreBlocks(reps, layer, ScoreArgs{q, 1, a.heads, Hk, a.head_dim, all.data(), n},
                      sc.data(), tc_);
    if (p.by_layer) SumOverHeads(sc.data(), Hk, n);
    const int64_t rows = p.by_layer ? 1 : Hk;
    std::vector<std::vector<int32_t>> sel(static_cast<size_t>(Hk)), kept(static_cast<size_t>(Hk));
    for (int64_t r = 0; r < rows; ++r) {
      // The shortlist: the `shortlist` best, in an order of no meaning.
      std::vector<int> idx(static_cast<size_t>(n));
      std::iota(idx.begin(), idx.end(), 0);
      const float* s = sc.data() + r * n;
      std::sort(idx.begin(), idx.end(),
                [&](int x, int y) { return pr::Better(s[x], all[x], s[y], all[y]); });
      idx.resize(static_cast<size_t>(std::min(n, p.shortlist)));
      std::shuffle(idx.begin(), idx.end(), rng_);
      std::vector<float> ss;
      std::vector<int32_t> si;
      for (int x : idx) ss.push_back(s[x]), si.push_back(all[x]);
      const int k = static_cast<int>(si.size());
      std::vector<int32_t> keep(static_cast<size_t>(p.retained) + 1);
      const int nk = has_ret ? pr::KeepRetained(ret[r].data(), static_cast<int>(ret[r].size()),
                                                static_cast<int32_t>(p.init_blocks),
                                                static_cast<int32_t>(p.ctx_end_block),
                                                static_cast<int>(p.retained), keep.data())
                             : 0;
      keep.resize(static_cast<size_t>(nk));
      std::vector<int32_t> members = keep;
      std::vector<char> marked(static_cast<size_t>(k));  // (as the kernel: kept entries marked)
      for (int i = 0; i < k; ++i) marked[i] = pr::Holds(keep.data(), nk, si[i]);
      for (int i = 0; i < k; ++i) {
        const int rank = pr::ShortlistRankOf(
            ss.data(), si.data(), k, [&](int j) { return marked[j] != 0; }, i);
        if (rank >= 0 && rank < p.topk - nk) members.push_back(si[i]);
      }
      std::vector<int32_t> row(members.size());
      for (int32_t b : members)
        row[pr::CountBelow(members.data(), static_cast<int>(members.size()), b)] = b;
      for (int64_t h = p.by_layer ? 0 : r; h < (p.by_layer ? Hk : r + 1); ++h)
        sel[h] = row, kept[h] = keep;
    }
    // Initial + selected + Local, and the selected blocks' sums.
    LayerPlan lp;
    lp.pos = a.pos0, lp.block_size = kv.block_size;
    lp.init_end = std::min(p.init_blocks * kv.block_size, a.pos0 + 1);
    lp.local_begin = p.ctx_end_block * kv.block_size;
    lp.blocks = sel;
    lp.ToSpans(Hk, &spans_);
    std::vector<float> lse(static_cast<size_t>(a.heads));
    b_.Attention(q, kv, a, &spans_, out, lse.data());
    if (p.retain) {
      std::vector<float> o(static_cast<size_t>(a.heads * a.head_dim)), l(lse.size()), stats;
      fast::AttendBlocks(q, kv, a, sel, o.data(), l.data(), &stats, tc_);
      ret.assign(static_cast<size_t>(Hk), {});
      std::vector<std::vector<float>> mass(static_cast<size_t>(Hk));
      size_t at = 0;
      for (int64_t h = 0; h < Hk; ++h)
        for (size_t i = 0; i < sel[h].size(); ++i, at += static_cast<size_t>(2 * G))
          mass[h].push_back(
              pr::BlockMass(stats.data() + at, lse.data() + h * G, static_cast<int>(G)));
      if (p.by_layer)
        for (int64_t h = 1; h < Hk; ++h)
          for (size_t i = 0; i < mass[0].size(); ++i) mass[0][i] += mass[h][i];
      for (int64_t r = 0; r < rows; ++r) {
        const int m = static_cast<int>(sel[r].size());
        std::vector<int> order(static_cast<size_t>(m));
        for (int i = 0; i < m; ++i) order[pr::MassRank(mass[r].data(), m, i)] = i;
        const std::vector<int32_t> keep =
            ParallelKeepByMass(sel[r].data(), order.data(), m, static_cast<int>(p.retained));
        for (int64_t h = p.by_layer ? 0 : r; h < (p.by_layer ? Hk : r + 1); ++h) ret[h] = keep;
      }
    }
    if (plan != nullptr) {
      plan->blocks = sel;
      plan->retained = has_ret ? kept : std::vector<std::vector<int32_t>>{};
    }
  }
  void TakeRetention(int64_t layer, std::vector<std::vector<int32_t>>* retained) override {
    ++taken;
    *retained = ret_[static_cast<size_t>(layer)];
  }

 private:
  Backend& b_;
  ThreadingContext& tc_;
  std::vector<std::vector<std::vector<int32_t>>> ret_;  // [layer][kv_head]
  std::mt19937 rng_{7};
  AttnSpans spans_;
};

struct Steps {
  std::string plans;
  std::vector<float> out;  // every decode step's output
};

// A prompt of N random tokens' keys, then `steps` decode queries over L layers; stop_at >= 0: the
// executor stops planning at that step (the planner takes its retention back).
Steps Decode(const SparseConfig& c, int run, bool sink, int64_t stop_at, RuleExecutor** ex_out,
             std::unique_ptr<RuleExecutor>* keep) {
  const int64_t D = 16, Hk = 2, H = 8, N = 120, steps = 24, L = 2;
  const ModelConfig m = test::AttentionShapes(L, H, Hk, D);
  static ThreadingContext tc(2);
  static auto backend = MakeCpuBackend(tc, false);
  const int64_t T = N + steps;
  const auto k = test::RandomVector(L * T * Hk * D, 21), v = test::RandomVector(L * T * Hk * D, 22);
  const auto q = test::RandomVector(L * T * H * D, 23, 2.f);
  KVCache cache(KVCacheShape{L, Hk, D, T, c.block_size, DType::kF32});
  for (int64_t l = 0; l < L; ++l)
    cache.Write(l, 0, T, k.data() + l * T * Hk * D, v.data() + l * T * Hk * D);
  SparseAttention sp(m, c, *backend, tc, T, DType::kF32);
  auto ex = std::make_unique<RuleExecutor>(*backend, tc, L);
  if (run > 0) sp.set_executor(ex.get());
  std::ostringstream plan;
  if (sink) sp.set_plan_sink(&plan);
  Steps r;
  std::vector<float> out(static_cast<size_t>(N * H * D));
  sp.BeginStep(StepInfo{0, N, N, true, 0});
  for (int64_t l = 0; l < L; ++l)
    sp.Attend(l, q.data() + l * T * H * D, AttnArgs{N, 0, H, Hk, D, 0, 0.25f}, cache, out.data());
  for (int64_t p = N; p < T; ++p) {
    if (p - N == stop_at) ex->plans = false;
    sp.BeginStep(StepInfo{p, 1, 1, true, p});
    for (int64_t l = 0; l < L; ++l) {
      sp.Attend(l, q.data() + (l * T + p) * H * D, AttnArgs{1, p, H, Hk, D, 0, 0.25f}, cache,
                out.data());
      r.out.insert(r.out.end(), out.begin(), out.begin() + H * D);
    }
  }
  r.plans = plan.str();
  *ex_out = ex.get();
  *keep = std::move(ex);
  return r;
}

TEST(ExecutorPlan, RulesGiveThePlannersPlansAndOutputs) {
  for (SelectMode sm : {SelectMode::kKVHead, SelectMode::kLayer})
    for (ReprType rt : {ReprType::kQuest, ReprType::kMax, ReprType::kMean})
      for (int64_t retain : {0, 3}) {
        SparseConfig c;
        c.block_size = 4, c.init_tokens = 4, c.local_window = 8, c.topk = 6, c.dense_layers = 0;
        c.retain_blocks = retain, c.select = sm, c.repr = rt;
        const std::string what = std::string(SelectModeName(sm)) + " " + ReprTypeName(rt) +
                                 " retain " + std::to_string(retain);
        RuleExecutor* ex = nullptr;
        std::unique_ptr<RuleExecutor> hold;
        const Steps base = Decode(c, 0, true, -1, &ex, &hold);
        EXPECT_EQ(ex->planned, 0);
        const Steps exec = Decode(c, 1, true, -1, &ex, &hold);
        EXPECT_EQ(ex->planned, 2 * 24) << what;  // every step of both layers
        EXPECT_EQ(ex->seeds, 2) << what;         // once per layer
        EXPECT_EQ(exec.plans, base.plans) << what;
        EXPECT_EQ(exec.out, base.out) << what;
        if (retain > 0) {
          EXPECT_NE(base.plans.find("\"retained\""), std::string::npos) << what;
        }
        // Without a reader of the plans, the same outputs.
        const Steps quiet = Decode(c, 1, false, -1, &ex, &hold);
        EXPECT_EQ(quiet.out, base.out) << what;
        // The executor stops planning after 10 steps: the planner selects with its retention.
        const Steps half = Decode(c, 1, true, 10, &ex, &hold);
        EXPECT_EQ(ex->planned, 2 * 10) << what;
        EXPECT_EQ(ex->taken, 2) << what;
        EXPECT_EQ(half.plans, base.plans) << what;
        EXPECT_EQ(half.out, base.out) << what;
      }
}

TEST(ExecutorPlan, OnlyWhereTheRulesAreAllThePlanNeeds) {
  const ModelConfig m = test::AttentionShapes(2, 8, 2, 16);
  ThreadingContext tc(1);
  auto backend = MakeCpuBackend(tc, false);
  RuleExecutor ex(*backend, tc, 2);
  const AttnArgs a{1, 100, 8, 2, 16, 0, 0.25f};
  SparseConfig base;
  base.block_size = 4, base.init_tokens = 4, base.local_window = 8, base.topk = 6;
  base.dense_layers = 1;
  auto plans = [&](const SparseConfig& c, bool recall, int64_t layer) {
    SparseAttention sp(m, c, *backend, tc, 200, DType::kF32);
    sp.set_executor(&ex);
    sp.set_recall(recall);
    sp.BeginStep(StepInfo{100, 1, 1, true, 100});
    return sp.PlansOnExecutor(layer, a);
  };
  EXPECT_TRUE(plans(base, false, 1));
  EXPECT_FALSE(plans(base, false, 0));  // a dense layer
  EXPECT_FALSE(plans(base, true, 1));   // --attn-recall
  SparseConfig c = base;
  c.repr = ReprType::kDynamic;
  EXPECT_FALSE(plans(c, false, 1));
  c = base, c.pos_remap = true;
  EXPECT_FALSE(plans(c, false, 1));
  c = base, c.rescore_blocks = 12;
  EXPECT_FALSE(plans(c, false, 1));
  c = base, c.token_step = 2;
  EXPECT_FALSE(plans(c, false, 1));
  c = base, c.layer_step = 2;
  EXPECT_FALSE(plans(c, false, 1));
  ex.plans = false;
  EXPECT_FALSE(plans(base, false, 1));
}

}  // namespace
}  // namespace needle
